"""Matplotlib for every stage's figures: no display needed, and each PNG written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unifit.atomic import atomic_path


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (cluster nodes and CI have no display); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path | str) -> Path:
    """Write `fig` to a temp file, then rename it over `path`: a kill mid-write never leaves a half PNG that a rerun
    would trust. The figure is closed (long runs draw many)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path
