"""Selection stages: sample (T for the scoring model), score (IFD of every instance), select (the Pithy set).

Each reads ALL instances from `generate/instances/` and writes only into its own directory; the
scoring-model SFT between sample and score is the training stage, chained by the pipeline.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from unifit.records import count_rows, parquet_files, read_column, read_parquet, write_instances
from unifit.selection.pithy import coverage, plot_ifd_histogram, select_pithy
from unifit.selection.sample import draw_sample
from unifit.stage import StageContext, UserError, write_json

log = logging.getLogger(__name__)


def _all_instances(ctx: StageContext) -> list[dict[str, Any]]:
    path = ctx.stage_dir("generate") / "instances"
    rows = read_parquet(path) if path.exists() else []
    if not rows:
        raise UserError(f"{path}: no instances to select from; run the generate stage (or set data.path to import a file)")
    return rows


def _instance_files(ctx: StageContext) -> list[Path]:
    """The instance shards, for stages that stream them rather than load them."""
    path = ctx.stage_dir("generate") / "instances"
    files = parquet_files(path) if path.exists() else []
    if not count_rows(files):
        raise UserError(f"{path}: no instances to select from; run the generate stage (or set data.path to import a file)")
    return files


def run_sample(ctx: StageContext) -> dict[str, Any]:
    """sample/sample.parquet: K random instances per leaf, about `sample.fraction` of all data."""
    sample, counts = draw_sample(_all_instances(ctx), ctx.cfg.sample.fraction, ctx.cfg.sample.seed)
    write_instances(sample, ctx.out_dir / "sample.parquet")
    write_json(ctx.out_dir / "report.json", counts)
    return counts


def run_score(ctx: StageContext) -> dict[str, Any]:
    """score/scores/shard-*.parquet: IFD of every instance under the scoring model (resumes by shard)."""
    from unifit.raycluster import ensure_ray
    from unifit.selection.score import score_sharded

    cfg = ctx.cfg
    scorer = cfg.scoring_model  # how the trained scorer is served: its base's dtype, context and chat template
    model_dir = ctx.stage_dir("train_scorer") / "model"
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir}: no scoring model; run the train_scorer stage first")
    files = _instance_files(ctx)
    ensure_ray(cfg.cluster)
    start = time.perf_counter()
    counts = score_sharded(
        files, ctx.out_dir / "scores", model_dir=model_dir, actors=cfg.cluster.scoring_actors,
        cpus_per_actor=cfg.cluster.cpus_per_actor, gpus_per_actor=cfg.cluster.gpus_per_actor, dtype=scorer.dtype,
        max_length=scorer.max_length, max_tokens_per_batch=cfg.select.max_tokens_per_batch,
        shard_size=cfg.select.score_shard_size, chat_template=scorer.chat_template,
        trust_remote_code=scorer.trust_remote_code,
    )
    seconds = time.perf_counter() - start
    truncated = read_column(parquet_files(ctx.out_dir / "scores"), "truncated")
    context_truncated = read_column(parquet_files(ctx.out_dir / "scores"), "context_truncated")
    counts.update(scored=truncated.count(False), truncated=sum(truncated), context_truncated=sum(context_truncated),
                  score_seconds=round(seconds, 3))
    return counts


def run_select(ctx: StageContext) -> dict[str, Any]:
    """select/pithy.parquet (instances, IFD descending), select/report.json and select/ifd_hist.png."""
    cfg = ctx.cfg.select
    instances = {row["id"]: row for row in _all_instances(ctx)}
    scores = read_parquet(ctx.stage_dir("score") / "scores")
    missing = len(set(instances) - {s["id"] for s in scores})
    if missing:
        raise UserError(f"{ctx.stage_dir('score') / 'scores'}: {missing} instances have no IFD score; rerun the score stage")
    selection = select_pithy(scores, ratio=cfg.ratio, max_ifd=cfg.max_ifd, min_per_leaf=cfg.min_per_leaf)
    kept = [instances[i] for i in selection.kept_ids]
    write_instances(kept, ctx.out_dir / "pithy.parquet")
    plot_ifd_histogram(scores, set(selection.kept_ids), cfg.max_ifd, ctx.out_dir / "ifd_hist.png")
    kept_ifd = [s["ifd"] for s in scores if s["id"] in set(selection.kept_ids)]
    finite = [s["ifd"] for s in scores if not s["truncated"] and math.isfinite(s["ifd"])]
    report = {
        "instances": len(instances), "target": selection.target, "kept": len(kept), "reasons": selection.reasons,
        "ratio": cfg.ratio, "max_ifd": cfg.max_ifd, "min_per_leaf": cfg.min_per_leaf,
        "ifd_min_kept": min(kept_ifd) if kept_ifd else None,
        "ifd_mean_all": sum(finite) / len(finite) if finite else None,
        "coverage_before": coverage(list(instances.values())), "coverage_after": coverage(kept),
        "leaves_before": len({row["leaf_id"] for row in instances.values()}),
        "leaves_after": len({row["leaf_id"] for row in kept}),
    }
    write_json(ctx.out_dir / "report.json", report)
    lost = sorted(set(report["coverage_before"]) - set(report["coverage_after"]))
    if lost:
        log.warning("selection keeps nothing from scopes %s; raise select.min_per_leaf to keep them", lost)
    return {"instances": len(instances), "kept": len(kept), **selection.reasons,
            "leaves_before": report["leaves_before"], "leaves_after": report["leaves_after"]}
