"""The report stage: this run's report.html / report.md in `<run_dir>/report/`."""

from __future__ import annotations

from typing import Any

from unifit.report.report import build_report
from unifit.stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    """Render the report from whatever this run has produced (missing stages become "not run" notes)."""
    return build_report([ctx.run_dir], ctx.out_dir, cfgs=[ctx.cfg])
