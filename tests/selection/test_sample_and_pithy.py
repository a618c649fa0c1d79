"""K-per-leaf sampling and the Pithy selection rules, on hand-made data with known answers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from conftest import assert_fingerprinted_reads, recording_context

from unifit.config import SelectConfig, UnifitConfig
from unifit.records import Instance, read_parquet, write_instances, write_parquet
from unifit.selection.pithy import count_groups, scope_of, select_pithy
from unifit.selection.sample import draw_sample, k_per_leaf
from unifit.selection.score import SCORE_SCHEMA
from unifit.selection.stage import run_sample, run_select
from unifit.stage import UserError


def instance(leaf: str, scope: str, index: int) -> dict:
    messages = [{"role": "user", "content": f"question {leaf} {index}"}, {"role": "assistant", "content": f"answer {index}"}]
    return Instance(messages, leaf_id=leaf, concept_path=["cyber", scope, leaf], source="concept_tree", generator="t").to_row()


def dataset(sizes: dict[str, int]) -> list[dict]:
    return [instance(leaf, "Email" if leaf < "m" else "DNS", i) for leaf, n in sizes.items() for i in range(n)]


def score(id_: str, leaf: str, ifd: float, truncated: bool = False) -> dict:
    return {"id": id_, "leaf_id": leaf, "concept_path": ["d", leaf], "ifd": ifd, "truncated": truncated}


def test_k_per_leaf_from_fraction_with_at_least_one() -> None:
    assert k_per_leaf(1000, 10, 0.05) == 5
    assert k_per_leaf(1000, 10, 0.10) == 10
    assert k_per_leaf(40, 10, 0.05) == 1  # 0.2 rounds to 0: every leaf still gives one


def test_sample_takes_k_from_every_leaf_seeded_and_order_free() -> None:
    rows = dataset({"a": 40, "b": 40, "c": 3, "x": 40, "y": 77})
    draw = lambda rows, seed: draw_sample([r["id"] for r in rows], [r["leaf_id"] for r in rows], 0.1, seed)  # noqa: E731
    sample, counts = draw(rows, 7)
    k = k_per_leaf(len(rows), 5, 0.1)
    assert counts == {"instances": 200, "leaves": 5, "k_per_leaf": k, "sample_size": 4 * k + 3,
                      "sample_fraction": round((4 * k + 3) / 200, 4)}
    leaf_of = {r["id"]: r["leaf_id"] for r in rows}
    per_leaf = {leaf: sum(leaf_of[i] == leaf for i in sample) for leaf in "abcxy"}
    assert per_leaf == {"a": 4, "b": 4, "c": 3, "x": 4, "y": 4}
    assert [leaf_of[i] for i in sample] == sorted(leaf_of[i] for i in sample)  # leaf by leaf
    assert len(set(sample)) == len(sample)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert draw(shuffled, 7)[0] == sample
    assert set(draw(rows, 8)[0]) != set(sample)


def test_selection_ratio_drops_ifd_ge_1_and_truncated() -> None:
    scores = [score(f"i{n:02d}", "leaf", ifd=n / 10) for n in range(20)]  # ifd 0.0 ... 1.9
    scores.append(score("t", "leaf", math.nan, truncated=True))
    scores.append(score("hi", "leaf", 0.95, truncated=True))  # truncated wins over a good-looking score
    sel = select_pithy(scores, ratio=0.25, max_ifd=1.0)
    assert sel.target == round(0.25 * 22) == 6  # ratio of ALL instances, truncated included
    assert sel.kept_ids == ["i09", "i08", "i07", "i06", "i05", "i04"]  # highest IFD below 1, descending
    assert sel.reasons == {"kept_by_rank": 6, "kept_by_quota": 0, "dropped_truncated": 2,
                           "dropped_ifd_ge_max": 10, "dropped_rank": 4}
    assert sum(sel.reasons.values()) == len(scores)


def test_selection_min_per_leaf_quota_keeps_every_leaf() -> None:
    scores = [score(f"a{n}", "a", 0.9 - n / 100) for n in range(10)]
    scores += [score(f"b{n}", "b", 0.5 - n / 100) for n in range(5)]
    scores += [score("c0", "c", 1.2)]  # leaf c has nothing eligible: a quota cannot invent data
    plain = select_pithy(scores, ratio=0.25, max_ifd=1.0)
    assert plain.kept_ids == ["a0", "a1", "a2", "a3"]
    quota = select_pithy(scores, ratio=0.25, max_ifd=1.0, min_per_leaf=1)
    assert quota.kept_ids == ["a0", "a1", "a2", "b0"]  # b0 by quota, then the best of the rest
    assert quota.reasons["kept_by_quota"] == 1 and quota.reasons["kept_by_rank"] == 3
    big_quota = select_pithy(scores, ratio=0.25, max_ifd=1.0, min_per_leaf=3)  # quota alone exceeds the target
    assert big_quota.kept_ids == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_stage_sample_and_select_write_their_files(tmp_path: Path) -> None:
    rows = dataset({"a": 30, "b": 30, "x": 30, "y": 30})
    random.Random(2).shuffle(rows)  # leaves spread over the shards
    for shard, start in enumerate(range(0, 120, 50)):  # 50 + 50 + 20 rows: the stages filter file by file
        write_instances(rows[start : start + 50], tmp_path / "generate" / "instances" / f"shard-{shard:05d}.parquet")
    by_id = {r["id"]: r for r in rows}
    cfg = UnifitConfig(select=SelectConfig(agreement_fraction=0))  # the scorer check is tested in test_scorer_choice.py
    sample_ctx = recording_context(cfg, tmp_path, "sample")
    counts = run_sample(sample_ctx)
    assert_fingerprinted_reads(sample_ctx)
    assert counts["sample_size"] == 4 * k_per_leaf(120, 4, cfg.sample.fraction) == 8
    drawn, _ = draw_sample([r["id"] for r in rows], [r["leaf_id"] for r in rows], cfg.sample.fraction, cfg.sample.seed)
    assert read_parquet(tmp_path / "sample" / "sample.parquet") == [by_id[i] for i in drawn]  # whole rows, drawn order

    ctx = recording_context(cfg, tmp_path, "select")
    with pytest.raises(UserError, match="no IFD score"):
        write_parquet([], tmp_path / "score" / "scores" / "shard-00000.parquet", SCORE_SCHEMA)
        run_select(ctx)
    rng = random.Random(0)
    scored = [{"id": r["id"], "leaf_id": r["leaf_id"], "concept_path": r["concept_path"], "cond_loss": 1.0,
               "direct_loss": 1.0, "ifd": rng.uniform(0.3, 1.3), "ifd_ppl": 1.0, "n_answer_tokens": 5,
               "truncated": False, "context_truncated": False} for r in rows]
    write_parquet(scored, tmp_path / "score" / "scores" / "shard-00000.parquet", SCORE_SCHEMA)
    counts = run_select(ctx)
    assert_fingerprinted_reads(ctx)
    expected = select_pithy(scored, ratio=cfg.select.ratio, max_ifd=1.0)
    pithy = read_parquet(tmp_path / "select" / "pithy.parquet")
    assert pithy == [by_id[i] for i in expected.kept_ids] and counts["kept"] == 7 == round(0.06 * 120)
    report = json.loads((tmp_path / "select" / "report.json").read_text())
    assert report["coverage_before"] == {"DNS": 60, "Email": 60}
    assert report["coverage_after"] == count_groups(scope_of(r["concept_path"]) for r in pithy)
    assert report["leaves_after"] == len({r["leaf_id"] for r in pithy})
    assert sum(report["reasons"].values()) == 120
    assert (tmp_path / "select" / "ifd_hist.png").stat().st_size > 5000
