"""What a stage receives from the pipeline: its config, its output directory, and where upstream outputs live.

A stage is a plain function `run(ctx: StageContext) -> dict[str, Any]` returning counts/metrics (numbers
and short strings); the pipeline records them with the stage's wall time in `timings.json`, the
manifest and W&B. A stage resumes by looking at what it already wrote under `ctx.out_dir` — the
pipeline keeps an interrupted stage's directory as long as its fingerprint is unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from unifit.config import UnifitConfig

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem the user can fix (bad input file, impossible setting); printed without a traceback."""


@dataclass
class StageContext:
    cfg: UnifitConfig
    run_dir: Path
    name: str
    log_metrics: Callable[[dict[str, Any]], None] = field(default=lambda metrics: None)

    @property
    def out_dir(self) -> Path:
        path = self.run_dir / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage_dir(self, stage: str) -> Path:
        """Output directory of another (upstream) stage."""
        return self.run_dir / stage


def write_json(path: str | Path, payload: Any) -> Path:
    """Atomic JSON write (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
