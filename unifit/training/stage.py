"""Pipeline stages that train: the scoring model (on the K-per-leaf sample) and the final variants.

Both are the same SFT recipe (`unifit.training.sft.run_sft`) on different data. A model directory that is
complete (exported and its metrics written) is never retrained, so an interrupted finetune stage resumes
with the variant it was on — and that variant resumes from its last Ray Train checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from unifit.config import ModelConfig
from unifit.records import count_rows, parquet_files
from unifit.stage import StageContext, UserError, read_json

log = logging.getLogger(__name__)

REPORTED = ("train_seconds", "rows_seconds", "loop_seconds", "steps", "final_loss", "tokens", "tokens_per_second", "examples", "truncated", "dropped_no_answer")


def _instances(ctx: StageContext, name: str) -> list[Path]:
    """The parquet files of the upstream output `name` (a UserError when they hold no instance)."""
    path = ctx.input(name)
    files = parquet_files(path)
    if not count_rows(files):
        raise UserError(f"{path} holds no instances: nothing to train on")
    return files


def _train(ctx: StageContext, data: str, out_dir: Path, neftune_alpha: float, model_cfg: ModelConfig,
           rows_dir: Optional[Path] = None) -> tuple[dict[str, Any], bool]:
    """Metrics of a finished model in `out_dir` (trained now on the upstream output `data`, or earlier: then `True` =
    reused, and `data` is not even looked at)."""
    from unifit.training.sft import METRICS_FILE, model_complete, run_sft

    if model_complete(out_dir):
        log.info("%s is complete; not retraining", out_dir / "model")
        return read_json(out_dir / METRICS_FILE), True
    return run_sft(ctx.cfg, _instances(ctx, data), out_dir, neftune_alpha=neftune_alpha, model_cfg=model_cfg,
                   rows_dir=rows_dir), False


def run_scorer(ctx: StageContext) -> dict[str, Any]:
    """SFT the scoring base (`scorer`, else the base model) on the scoring sample T (no NEFTune) -> train_scorer/model/."""
    metrics, reused = _train(ctx, "sample", ctx.out_dir, neftune_alpha=0.0, model_cfg=ctx.cfg.scoring_model)
    return {**{key: metrics[key] for key in REPORTED if key in metrics}, "reused": int(reused)}


def run_finetune(ctx: StageContext) -> dict[str, Any]:
    """One model per `cfg.variants` entry -> finetune/<variant>/model/; `train_seconds` sums the variants. Variants on
    the same data share its training rows (finetune/rows/<data>/): with and without NEFTune, the rows are the same."""
    sources = {"pithy": "pithy", "all": "instances"}  # variant.data -> the upstream output it trains on
    result: dict[str, Any] = {"train_seconds": 0.0, "reused": 0}
    for variant in ctx.cfg.variants:
        alpha = ctx.cfg.train.neftune_alpha if variant.neftune else 0.0
        metrics, reused = _train(ctx, sources[variant.data], ctx.out_dir / variant.name, alpha, ctx.cfg.model,
                                 rows_dir=ctx.out_dir / "rows" / variant.data)
        result["train_seconds"] += float(metrics["train_seconds"])
        result["reused"] += int(reused)
        for key in REPORTED:
            if key in metrics:
                result[f"{variant.name}_{key}"] = metrics[key]
        ctx.log_metrics({f"finetune/{variant.name}/{key}": metrics[key] for key in REPORTED if key in metrics})
    return result
