"""What a stage receives from the pipeline: its config, its output directory, and where upstream outputs live.

A stage is a plain function `run(ctx: StageContext) -> dict[str, Any]` returning counts/metrics (numbers
and short strings); the pipeline records them with the stage's wall time in `timings.json`, the
manifest and W&B, together with what serving its models cost (`release_models`). A stage gets its model
clients from `ctx.connect`: each model is loaded once per actor for all the calls of the stage. It reads what upstream stages wrote through
`ctx.input(name)`, the outputs they declare. A stage resumes by looking at what it already wrote under `ctx.out_dir` — the
pipeline keeps an interrupted stage's directory as long as its fingerprint is unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from unifit.atomic import write_text_atomic
from unifit.config import BackendConfig, ModelConfig, UnifitConfig

if TYPE_CHECKING:
    from unifit.llm.client import ModelClient, ModelClients

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem the user can fix (bad input file, impossible setting); printed without a traceback."""


@dataclass
class StageContext:
    cfg: UnifitConfig
    run_dir: Path
    name: str
    log_metrics: Callable[[dict[str, Any]], None] = field(default=lambda metrics: None)
    clients: Optional["ModelClients"] = field(default=None, repr=False)  # created by the first `connect`

    def connect(self, model_cfg: ModelConfig, backend: BackendConfig, desc: str) -> "ModelClient":
        """A client for one model role of this stage; roles with the same model and backend share its actors."""
        from unifit.llm.client import ModelClients

        if self.clients is None:
            self.clients = ModelClients(self.cfg.cluster, self.cfg.cache_dir)
        return self.clients.connect(model_cfg, backend, desc)

    def release_models(self) -> dict[str, Any]:
        """Release every model of the stage and return what serving them cost (loads, seconds, calls; zeros if none)."""
        from unifit.llm.client import ModelClients

        clients = self.clients or ModelClients(self.cfg.cluster, self.cfg.cache_dir)
        clients.close()
        return clients.metrics()

    @property
    def out_dir(self) -> Path:
        path = self.run_dir / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def input(self, name: str, **fields: str) -> Path:
        """The path of the upstream output `name` (declared in `unifit.pipeline.STAGE_SPECS`; `fields` fill its
        placeholders); a UserError naming the stage to run when it is missing."""
        from unifit.pipeline import stage_input  # unifit.pipeline imports this module

        path = stage_input(self.cfg, self.run_dir, self.name, name, required=True, **fields)
        assert path is not None  # required=True raises instead
        return path

    def optional_input(self, name: str, **fields: str) -> Optional[Path]:
        """The path of the upstream output `name`, or None when the upstream stage did not write it."""
        from unifit.pipeline import stage_input  # unifit.pipeline imports this module

        return stage_input(self.cfg, self.run_dir, self.name, name, required=False, **fields)


def write_json(path: str | Path, payload: Any) -> Path:
    """Atomic JSON write (temp + rename)."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
