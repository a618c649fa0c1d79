"""Sharded IFD scoring on a Ray Data actor pool: 2 actors == 1 actor == in-process, and resume by shard."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from conftest import assert_fingerprinted_reads, recording_context, tiny_model_config
from unifit.config import ClusterConfig, SelectConfig, UnifitConfig
from unifit.models import resolve_model_dir
from unifit.records import Instance, read_parquet, write_instances, write_parquet
from unifit.selection.ifd import score_conversations
from unifit.selection.score import SCORE_SCHEMA, score_sharded
from unifit.selection.stage import run_score
from unifit.stage import StageContext

MAX_LENGTH = 64


def instances() -> list[dict]:
    rows = []
    for i in range(9):
        answer = " ".join(["the resolver caches the record"] * (1 + i % 3))
        messages = [{"role": "user", "content": f"Question {i}: how does DNS caching work?"},
                    {"role": "assistant", "content": answer}]
        if i == 4:
            messages += [{"role": "user", "content": "And negative caching?"},
                         {"role": "assistant", "content": "NXDOMAIN answers are cached for the SOA minimum."}]
        rows.append(Instance(messages, f"leaf{i % 3}", ["cyber", "DNS", f"leaf{i % 3}"], "concept_tree", "t").to_row())
    too_long = [{"role": "user", "content": "Recite."}, {"role": "assistant", "content": "word " * 100}]
    rows.append(Instance(too_long, "leaf0", ["cyber", "DNS", "leaf0"], "concept_tree", "t").to_row())
    return rows


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in rows}


def assert_same_scores(a: dict[str, dict], b: dict[str, dict], tol: float) -> None:
    assert a.keys() == b.keys()
    for key, row in a.items():
        assert row["truncated"] == b[key]["truncated"] and row["n_answer_tokens"] == b[key]["n_answer_tokens"]
        for name in ("cond_loss", "direct_loss", "ifd", "ifd_ppl"):
            x, y = row[name], b[key][name]
            assert (math.isnan(x) and math.isnan(y)) or abs(x - y) < tol, (key, name, x, y)


@pytest.fixture()
def run_dir(tmp_path: Path, cache_dir: Path) -> Path:
    rows = instances()  # two files of 3 and 7 rows, so the second score shard (4 rows) spans both
    write_instances(rows[:3], tmp_path / "generate" / "instances" / "shard-00000.parquet")
    write_instances(rows[3:], tmp_path / "generate" / "instances" / "shard-00001.parquet")
    (tmp_path / "train_scorer").mkdir()
    os.symlink(resolve_model_dir(tiny_model_config("llama"), cache_dir), tmp_path / "train_scorer" / "model")
    return tmp_path


def test_two_actors_equal_one_actor_and_resume(ray_local, run_dir: Path, tiny_model, tiny_tokenizer) -> None:
    model_cfg = tiny_model_config("llama")
    model_cfg.max_length = MAX_LENGTH
    cfg = UnifitConfig(model=model_cfg, cluster=ClusterConfig(scoring_actors=2),
                       select=SelectConfig(score_shard_size=4, max_tokens_per_batch=128))
    ctx = recording_context(cfg, run_dir, "score")
    counts = run_score(ctx)
    assert_fingerprinted_reads(ctx)
    assert counts["shards"] == 3 and counts["shards_computed"] == 3 and counts["shards_reused"] == 0
    assert counts["scored"] == 9 and counts["truncated"] == 1 and counts["score_seconds"] > 0
    assert 1 <= counts["scorer_loads"] <= 2  # one per actor, never one per shard
    two = by_id(read_parquet(run_dir / "score" / "scores"))

    one_dir = run_dir / "one_actor"
    one = score_sharded(run_dir / "generate" / "instances", one_dir, model_dir=run_dir / "train_scorer" / "model", actors=1, cpus_per_actor=1,
                  gpus_per_actor=0, dtype="float32", max_length=MAX_LENGTH, max_tokens_per_batch=128, shard_size=4)
    assert one["scorer_loads"] == 1 and one["shards_computed"] == 3
    assert_same_scores(two, by_id(read_parquet(one_dir)), tol=1e-6)

    rows = instances()
    local = score_conversations(tiny_model, tiny_tokenizer, [r["messages"] for r in rows], max_length=MAX_LENGTH,
                                max_tokens_per_batch=100_000)
    assert_same_scores(two, {r["id"]: {**s, "id": r["id"]} for r, s in zip(rows, local)}, tol=1e-4)

    # resume: shard 1 lost, shard 0 marked; only shard 1 is recomputed, shard 0 is trusted as written
    scores_dir = run_dir / "score" / "scores"
    (scores_dir / "shard-00001.parquet").unlink()
    marked = [{**row, "ifd": -1.0} for row in read_parquet(scores_dir / "shard-00000.parquet")]
    write_parquet(marked, scores_dir / "shard-00000.parquet", SCORE_SCHEMA)
    counts = run_score(StageContext(cfg, run_dir, "score"))
    assert counts["shards_computed"] == 1 and counts["shards_reused"] == 2 and counts["scorer_loads"] == 1
    again = by_id(read_parquet(scores_dir))
    assert all(again[row["id"]]["ifd"] == -1.0 for row in marked)
    assert_same_scores({k: v for k, v in two.items() if k not in {r["id"] for r in marked}},
                       {k: v for k, v in again.items() if k not in {r["id"] for r in marked}}, tol=1e-6)
