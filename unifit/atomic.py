"""Atomic file writes: write a temp file beside the target, then rename it over the target.

Stages resume by trusting the files they find, so a kill mid-write must never leave a half file under the final
name. The temp name starts with a dot and does not end with the target's suffix, so the globs that collect outputs
(`*.parquet`, `*.png`) never pick one up.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write `path`'s content to; renamed over `path` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
