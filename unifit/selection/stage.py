"""Selection stages: sample (T for the scoring model), score (IFD of every instance), select (the Pithy set).

Each reads ALL instances (`ctx.input("instances")`) and writes only into its own directory; the
scoring-model SFT between sample and score is the training stage, chained by the pipeline. Sample and select hold
only columns (ids, leaves, scopes, scores) in Python; the rows they write are filtered from the shards as Arrow.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from unifit.config import DataConfig, ModelConfig
from unifit.records import count_rows, parquet_files, read_column, read_parquet, write_rows_by_id
from unifit.selection.pithy import count_groups, plot_ifd_histogram, scope_of, select_pithy
from unifit.selection.sample import draw_sample
from unifit.stage import StageContext, UserError, write_json

log = logging.getLogger(__name__)


def _instance_files(ctx: StageContext) -> list[Path]:
    """The instance shards, for stages that stream them rather than load them."""
    path = ctx.input("instances")
    files = parquet_files(path)
    if not count_rows(files):
        raise UserError(f"{path}: no instances to select from; run the generate stage (or set data.path to import a file)")
    return files


def run_sample(ctx: StageContext) -> dict[str, Any]:
    """sample/sample.parquet: K random instances per leaf, about `sample.fraction` of all data."""
    files = _instance_files(ctx)
    sample, counts = draw_sample(read_column(files, "id"), read_column(files, "leaf_id"), ctx.cfg.sample.fraction,
                                 ctx.cfg.sample.seed)
    write_rows_by_id(files, sample, ctx.out_dir / "sample.parquet")
    write_json(ctx.out_dir / "report.json", counts)
    return counts


def run_score(ctx: StageContext) -> dict[str, Any]:
    """score/scores/shard-*.parquet: IFD of every instance under the scoring model (resumes by shard)."""
    from unifit.raycluster import ensure_ray

    cfg = ctx.cfg
    scorer = cfg.scoring_model  # how the scorer is served: its (base's) dtype, context and chat template
    if cfg.select.train_scorer:
        model_dir: Path | str = ctx.input("scorer")
    else:
        model_dir = _model_dir(ctx, scorer)
    files = _instance_files(ctx)
    ensure_ray(cfg.cluster)
    start = time.perf_counter()
    counts = _score(ctx, files, ctx.out_dir / "scores", model_dir, scorer)
    seconds = time.perf_counter() - start
    truncated = read_column(parquet_files(ctx.out_dir / "scores"), "truncated")
    context_truncated = read_column(parquet_files(ctx.out_dir / "scores"), "context_truncated")
    counts.update(scored=truncated.count(False), truncated=sum(truncated), context_truncated=sum(context_truncated),
                  score_seconds=round(seconds, 3), scorer_trained=int(cfg.select.train_scorer))
    return counts


def _model_dir(ctx: StageContext, model: ModelConfig) -> Path | str:
    """Local directory of an untrained model (the embedded/random ones are converted into the cache once)."""
    from unifit.models import resolve_model_dir

    return resolve_model_dir(model, ctx.cfg.cache_dir)


def _score(ctx: StageContext, instances: list[Path], out_dir: Path, model_dir: Path | str,
           served_as: ModelConfig) -> dict[str, Any]:
    """IFD of the instances in the parquet files `instances` under the model in `model_dir`, served with
    `served_as`'s dtype, context and template."""
    from unifit.selection.score import score_sharded

    cfg = ctx.cfg
    return score_sharded(
        instances, out_dir, model_dir=model_dir, actors=cfg.cluster.scoring_actors,
        cpus_per_actor=cfg.cluster.cpus_per_actor, gpus_per_actor=cfg.cluster.gpus_per_actor, dtype=served_as.dtype,
        max_length=served_as.max_length, max_tokens_per_batch=cfg.select.max_tokens_per_batch,
        shard_size=cfg.select.score_shard_size, chat_template=served_as.chat_template,
        trust_remote_code=served_as.trust_remote_code, pad_token=served_as.pad_token,
    )


def _scopes(files: list[Path]) -> list[str]:
    """The scope of every instance, in file order (from `concept_path`, one file at a time; one string object per scope)."""
    return [sys.intern(scope_of(path)) for file in files for path in read_column([file], "concept_path")]


def run_select(ctx: StageContext) -> dict[str, Any]:
    """select/pithy.parquet (instances, IFD descending), select/report.json and select/ifd_hist.png."""
    cfg = ctx.cfg.select
    files = _instance_files(ctx)
    ids, leaf_ids, scopes = read_column(files, "id"), read_column(files, "leaf_id"), _scopes(files)
    score_files = parquet_files(ctx.input("scores"))
    scores = [row for file in score_files for row in pq.read_table(file, columns=["id", "leaf_id", "ifd", "truncated"]).to_pylist()]
    missing = len(set(ids) - {s["id"] for s in scores})
    if missing:
        raise UserError(f"{ctx.input('scores')}: {missing} instances have no IFD score; rerun the score stage")
    selection = select_pithy(scores, ratio=cfg.ratio, max_ifd=cfg.max_ifd, min_per_leaf=cfg.min_per_leaf)
    write_rows_by_id(files, selection.kept_ids, ctx.out_dir / "pithy.parquet")
    kept_set = set(selection.kept_ids)
    plot_ifd_histogram(scores, kept_set, cfg.max_ifd, ctx.out_dir / "ifd_hist.png")
    kept_ifd = [s["ifd"] for s in scores if s["id"] in kept_set]
    finite = [s["ifd"] for s in scores if not s["truncated"] and math.isfinite(s["ifd"])]
    kept_rows = [i for i, id_ in enumerate(ids) if id_ in kept_set]
    before, after = count_groups(scopes), count_groups(scopes[i] for i in kept_rows)
    report = {
        "instances": len(ids), "target": selection.target, "kept": len(kept_set), "reasons": selection.reasons,
        "ratio": cfg.ratio, "max_ifd": cfg.max_ifd, "min_per_leaf": cfg.min_per_leaf,
        "ifd_min_kept": min(kept_ifd) if kept_ifd else None,
        "ifd_mean_all": sum(finite) / len(finite) if finite else None,
        "coverage_before": before, "coverage_after": after,
        "group_by": ctx.cfg.data.group_by if ctx.cfg.data.path else None, "grouping": _grouping(ctx.cfg.data),
        "groups": {group: {"kept": after.get(group, 0), "total": total} for group, total in before.items()},
        "leaves_before": len(set(leaf_ids)),
        "leaves_after": len({leaf_ids[i] for i in kept_rows}),
        "scorer_trained": ctx.cfg.select.train_scorer,
        "agreement": _check_scorer(ctx, files, ids, scores),
    }
    write_json(ctx.out_dir / "report.json", report)
    lost = sorted(set(report["coverage_before"]) - set(report["coverage_after"]))
    if lost:
        log.warning("selection keeps nothing from groups %s; raise select.min_per_leaf to keep them", lost)
    check = report["agreement"]
    agreement_metrics = ({"agreement_spearman": check["spearman"], "agreement_top_overlap": check["top_overlap"],
                          "agreement_seconds": check["seconds"]} if "spearman" in check else {})
    return {"instances": len(ids), "kept": len(kept_set), **selection.reasons,
            "leaves_before": report["leaves_before"], "leaves_after": report["leaves_after"], **agreement_metrics}


def _grouping(data: DataConfig) -> str:
    """What the groups of `groups`/`coverage_*` are, in words for the report."""
    if not data.path:
        return "concept-tree scope"
    if data.group_by:
        return f"data.group_by={data.group_by}"
    return "the imported file's leaf_id/category column (one group for the file without it)"


def _check_scorer(ctx: StageContext, files: list[Path], ids: list[str], scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Score a random sample with the tuned model (`model`) too and compare its IFD ranking with the scorer's.

    Writes select/agreement_scores/ (the tuned model's scores, resumable by shard) and select/agreement.png; returns the
    statistics (or why the check did not run). Its time is `seconds`, kept apart from selection time.
    """
    from unifit.raycluster import ensure_ray
    from unifit.selection.agreement import agreement, check_sample, check_size, plot_agreement

    cfg = ctx.cfg
    if not cfg.checks_scorer:
        reason = ("the scorer is the model being tuned" if cfg.scorer_is_tuned_model else "select.agreement_fraction=0")
        return {"skipped": reason}
    size = check_size(len(ids), cfg.select.agreement_fraction, cfg.select.agreement_max_instances)
    checked_ids = set(check_sample(ids, size, cfg.select.agreement_seed))
    start = time.perf_counter()
    ensure_ray(cfg.cluster)
    checked = write_rows_by_id(files, [id_ for id_ in ids if id_ in checked_ids], ctx.out_dir / "agreement_instances.parquet")
    _score(ctx, [checked], ctx.out_dir / "agreement_scores", _model_dir(ctx, cfg.model), cfg.model)
    seconds = time.perf_counter() - start
    reference = read_parquet(ctx.out_dir / "agreement_scores")
    scorer = [row for row in scores if row["id"] in checked_ids]
    stats = agreement(scorer, reference, ratio=cfg.select.ratio, max_ifd=cfg.select.max_ifd)
    scorer_label = f"scorer ({cfg.scoring_model.name}{', trained on the sample' if cfg.select.train_scorer else ''})"
    plot_agreement(scorer, reference, stats, cfg.select.max_ifd, ctx.out_dir / "agreement.png",
                   scorer_label=scorer_label, reference_label=f"tuned model ({cfg.model.name})")
    spearman = stats["spearman"]
    return {**stats, "spearman": spearman if math.isfinite(spearman) else None, "scorer": scorer_label,
            "reference": f"tuned model ({cfg.model.name})", "fraction": cfg.select.agreement_fraction,
            "seconds": round(seconds, 3)}
