"""Scoring with a given (untrained) scorer, the scorer check against the tuned model, and data.group_by quotas."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from conftest import assert_fingerprinted_reads, recording_context, tiny_model_config
from unifit import pipeline
from unifit.config import ClusterConfig, ConfigError, DataConfig, ModelConfig, SelectConfig, UnifitConfig
from unifit.data_import import import_instances
from unifit.records import Instance, read_parquet, write_instances, write_parquet
from unifit.selection.agreement import agreement, average_ranks, check_sample, check_size, spearman, top_set
from unifit.selection.score import SCORE_SCHEMA
from unifit.selection.stage import run_score, run_select
from unifit.stage import StageContext, UserError


def row(id_: str, ifd: float, truncated: bool = False) -> dict:
    return {"id": id_, "ifd": ifd, "truncated": truncated}


# --- agreement statistics against hand computations -------------------------------------------------------------

def test_average_ranks_share_ties() -> None:
    assert average_ranks([0.5, 0.1, 0.5, 0.9]) == [2.5, 1.0, 2.5, 4.0]


def test_spearman_by_hand() -> None:
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); ranks a = 1..5, b = 2,1,4,3,5 -> sum d^2 = 4 -> 1 - 24/120 = 0.8
    assert spearman([0.1, 0.2, 0.3, 0.4, 0.5], [0.7, 0.6, 0.9, 0.8, 1.0]) == pytest.approx(0.8)
    # ties: ranks a = 1, 2.5, 2.5, 4; b = 1, 2, 3, 4. Pearson of the ranks: cov = 4.5, var_a = 4.5, var_b = 5
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


def test_agreement_by_hand() -> None:
    scorer = [row("a", 0.9), row("b", 0.8), row("c", 0.7), row("d", 0.6), row("e", 1.2), row("f", math.nan, True)]
    reference = [row("a", 0.5), row("b", 0.95), row("c", 0.85), row("d", 0.3), row("e", 0.7), row("f", 0.4)]
    stats = agreement(scorer, reference, ratio=0.5, max_ifd=1.0)
    # top_k = round(0.5 * 6) = 3; scorer's selectable (ifd < 1, not truncated): a, b, c, d -> top a, b, c;
    # reference's: b, c, e -> overlap {b, c} = 2 of 3
    assert stats["top_k"] == 3 and stats["top_both"] == 2 and stats["top_overlap"] == pytest.approx(2 / 3)
    assert stats["top_scorer_only"] == 1 and stats["top_reference_only"] == 1
    # pairs: a..e (f is truncated for the scorer). scorer ranks a4 b3 c2 d1 e5; reference a2 b5 c4 d1 e3
    # sum d^2 = 4 + 4 + 4 + 0 + 4 = 16 -> rho = 1 - 6*16 / (5*24) = 0.2
    assert stats["paired"] == 5 and stats["spearman"] == pytest.approx(0.2)
    assert stats["ifd_mean_scorer"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6 + 1.2) / 5)
    assert top_set(scorer, 2, 1.0) == {"a", "b"}
    with pytest.raises(ValueError, match="same instances"):
        agreement(scorer, reference[:-1], ratio=0.5, max_ifd=1.0)


def test_check_sample_size_and_draw() -> None:
    assert check_size(3111, 0.02, 2000) == 62
    assert check_size(500_000, 0.02, 2000) == 2000
    assert check_size(30, 0.02, 2000) == 30  # small data are checked whole
    assert check_size(1000, 0.02, 2000) == 50  # at least 50 for a meaningful rank correlation
    assert check_size(1000, 0.0, 2000) == 0
    ids = [f"id{i}" for i in range(100)]
    drawn = check_sample(ids, 10, seed=0)
    assert len(set(drawn)) == 10 and set(drawn) <= set(ids)
    assert check_sample(list(reversed(ids)), 10, seed=0) == drawn  # independent of input order
    assert check_sample(ids, 10, seed=1) != drawn


# --- pipeline: an untrained scorer skips the sample and its training, and fingerprints follow ---------------------

def test_untrained_scorer_skips_sample_and_training_and_shares_scoring() -> None:
    untrained = SelectConfig(train_scorer=False)
    scorer, writer = ModelConfig(name="small"), ModelConfig(name="writer")
    a = UnifitConfig(model=ModelConfig(name="a"), generator=writer, scorer=scorer, select=untrained)
    b = UnifitConfig(model=ModelConfig(name="b"), generator=writer, scorer=scorer, select=untrained)
    assert pipeline.active_stages(a) == ["generate", "score", "select", "finetune", "evaluate", "report"]
    pa, pb = pipeline.stage_fingerprints(a), pipeline.stage_fingerprints(b)
    assert pa["score"] == pb["score"]  # one scoring for every base model that uses this scorer
    assert pa["select"] != pb["select"]  # the check compares against each run's own tuned model
    # scoring no longer depends on the sample or the training recipe, but does on the scorer itself
    retrained = UnifitConfig(model=ModelConfig(name="a"), generator=writer, scorer=scorer, select=untrained)
    retrained.train.learning_rate, retrained.sample.fraction = 1e-3, 0.2
    assert pipeline.stage_fingerprints(retrained)["score"] == pa["score"]
    other = UnifitConfig(model=ModelConfig(name="a"), generator=writer, scorer=ModelConfig(name="other"), select=untrained)
    assert pipeline.stage_fingerprints(other)["score"] != pa["score"]
    trained = pipeline.stage_fingerprints(UnifitConfig(model=ModelConfig(name="a"), generator=writer, scorer=scorer))
    assert trained["score"] != pa["score"]
    # a ratio sweep shares the scoring whichever way the scorer was made
    for select in (SelectConfig(train_scorer=False, ratio=0.1), SelectConfig(ratio=0.1)):
        swept = UnifitConfig(model=ModelConfig(name="a"), scorer=scorer, select=select)
        base = UnifitConfig(model=ModelConfig(name="a"), scorer=scorer, select=SelectConfig(train_scorer=select.train_scorer))
        assert pipeline.stage_fingerprints(swept)["score"] == pipeline.stage_fingerprints(base)["score"]


def test_scorer_check_runs_only_when_the_scorer_is_another_model() -> None:
    assert UnifitConfig().checks_scorer  # a trained scorer is not the model being tuned
    itself = UnifitConfig(select=SelectConfig(train_scorer=False))
    assert itself.scorer_is_tuned_model and not itself.checks_scorer
    assert UnifitConfig(scorer=ModelConfig(name="small"), select=SelectConfig(train_scorer=False)).checks_scorer
    assert not UnifitConfig(select=SelectConfig(agreement_fraction=0)).checks_scorer
    # without the check, select does not depend on the base model
    off = SelectConfig(train_scorer=False, agreement_fraction=0)
    prints = [pipeline.stage_fingerprints(UnifitConfig(model=ModelConfig(name=n), generator=ModelConfig(name="w"), scorer=ModelConfig(name="s"), select=off))
              for n in ("a", "b")]
    assert prints[0]["select"] == prints[1]["select"]


def test_pipeline_run_with_untrained_scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "_stage_function", lambda stage: lambda ctx: calls.append(stage) or {})
    cfg = UnifitConfig(run_dir=str(tmp_path), stages=["generate", "sample", "train_scorer", "score", "select"],
                       select=SelectConfig(train_scorer=False))
    cfg.wandb.mode = "disabled"
    pipeline.run(cfg)
    assert calls == ["generate", "score", "select"]
    # score alone needs only generate now
    calls.clear()
    score_only = UnifitConfig(run_dir=str(tmp_path), stages=["score"], select=SelectConfig(train_scorer=False, ratio=0.5))
    score_only.wandb.mode = "disabled"
    pipeline.run(score_only)
    assert calls == []  # up to date: ratio is not part of scoring


# --- the stages on tiny models: scoring with a given model, and the check ------------------------------------------

def conversations(n: int) -> list[dict]:
    rng = random.Random(0)
    words = "dns record zone resolver cache mail server key signature policy".split()
    rows = []
    for i in range(n):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))
        messages = [{"role": "user", "content": f"Question {i}: explain {rng.choice(words)}."},
                    {"role": "assistant", "content": answer}]
        rows.append(Instance(messages, f"leaf{i % 2}", ["d", "scope", f"leaf{i % 2}"], "imported", "t").to_row())
    return rows


def test_untrained_scorer_and_the_check_on_tiny_models(ray_local, tmp_path: Path, cache_dir: Path) -> None:
    from unifit.models import load_model, load_tokenizer
    from unifit.selection.ifd import score_conversations

    from unifit.models import resolve_model_dir

    rows = conversations(12)
    write_instances(rows, tmp_path / "generate" / "instances" / "shard-00000.parquet")
    # the scorer is a local model directory, as a scorer trained in an earlier run is given
    earlier = resolve_model_dir(tiny_model_config("llama"), cache_dir)
    scorer = ModelConfig(name="earlier_scorer", source="hub", path=str(earlier), max_length=512)
    tuned = tiny_model_config("qwen2")
    cfg = UnifitConfig(model=tuned, scorer=scorer, cluster=ClusterConfig(scoring_actors=1),
                       select=SelectConfig(train_scorer=False, ratio=0.25, max_ifd=10.0, score_shard_size=5))
    score_ctx = recording_context(cfg, tmp_path, "score")
    counts = run_score(score_ctx)  # no train_scorer/ directory: the scorer as configured
    assert_fingerprinted_reads(score_ctx)
    assert counts["scored"] == 12 and counts["scorer_trained"] == 0
    assert 0 < counts["padding_efficiency"] <= 1 and counts["reference_flops_ratio"] > 1

    select_ctx = recording_context(cfg, tmp_path, "select")
    counts = run_select(select_ctx)
    assert_fingerprinted_reads(select_ctx)
    report = json.loads((tmp_path / "select" / "report.json").read_text())
    check = report["agreement"]
    assert check["sample"] == 12 and len(read_parquet(tmp_path / "select" / "agreement_scores")) == 12
    assert (tmp_path / "select" / "agreement.png").stat().st_size > 5000

    # the same numbers from both models scored here directly
    def direct(model_cfg: ModelConfig) -> list[dict]:
        model, tokenizer = load_model(model_cfg, cache_dir).eval(), load_tokenizer(model_cfg, cache_dir)
        scores = score_conversations(model, tokenizer, [r["messages"] for r in rows], max_length=model_cfg.max_length)
        return [{"id": r["id"], **s} for r, s in zip(rows, scores)]

    mine, theirs = direct(scorer), direct(tuned)
    by_id = {r["id"]: r["ifd"] for r in theirs}
    assert all(abs(s["ifd"] - by_id[s["id"]]) < 1e-4 for s in read_parquet(tmp_path / "select" / "agreement_scores"))
    expected = spearman([s["ifd"] for s in mine], [by_id[s["id"]] for s in mine])
    assert check["spearman"] == pytest.approx(expected, abs=1e-6)
    assert check["top_k"] == 3 and check["top_both"] == len(top_set(mine, 3, 10.0) & top_set(theirs, 3, 10.0))
    assert counts["agreement_spearman"] == check["spearman"]


# --- data.group_by ------------------------------------------------------------------------------------------------

def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_group_by_column_becomes_the_leaf_and_scope(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "mine.jsonl", [
        {"instruction": "Write a loop.", "output": "for i in range(3): print(i)", "kind": "code", "category": "x"},
        {"instruction": "Say hi.", "output": "Hi!", "kind": "chat"},
    ])
    instances, report = import_instances(data, group_by="kind")
    assert [i.leaf_id for i in instances] == ["code", "chat"]
    assert [i.concept_path for i in instances] == [["mine", "code"], ["mine", "chat"]]
    assert report["group_by"] == "kind"


@pytest.mark.parametrize("value, match", [(None, "no 'kind' field"), (3, "must be a non-empty string.*got int 3"),
                                          ("  ", "must be a non-empty string")])
def test_group_by_missing_or_not_a_string_is_a_clear_error(tmp_path: Path, value: object, match: str) -> None:
    second = {"instruction": "Say hi.", "output": "Hi!"} | ({} if value is None else {"kind": value})
    data = write_rows(tmp_path / "mine.jsonl", [{"instruction": "a", "output": "b", "kind": "code"}, second])
    with pytest.raises(UserError, match=rf"mine.jsonl:2: data.group_by=kind: .*{match}"):
        import_instances(data, group_by="kind")
    instances, report = import_instances(data, lenient=True, group_by="kind")
    assert len(instances) == 1 and sum(report["skipped"].values()) == 1


def test_group_by_needs_imported_data() -> None:
    with pytest.raises(ConfigError, match="data.group_by"):
        UnifitConfig(data=DataConfig(group_by="category"))
    with pytest.raises(ConfigError, match="data.group_by"):
        DataConfig(path="x.json", group_by=" ")


def test_group_by_quota_protects_a_small_group_and_is_reported(tmp_path: Path) -> None:
    """Cherry_LLM#10: IFD under-selects code. With min_per_leaf the small group keeps its best instances."""
    rows = [{"instruction": f"chat {i}", "output": f"reply {i}", "kind": "chat"} for i in range(40)]
    rows += [{"instruction": f"code {i}", "output": f"x = {i}", "kind": "code"} for i in range(5)]
    data = write_rows(tmp_path / "mine.jsonl", rows)
    instances, _ = import_instances(data, group_by="kind")
    write_instances([i.to_row() for i in instances], tmp_path / "generate" / "instances" / "shard-00000.parquet")
    scores = [{"id": i.id, "leaf_id": i.leaf_id, "concept_path": i.concept_path, "cond_loss": 1.0, "direct_loss": 1.0,
               "ifd": (0.9 - n / 100) if i.leaf_id == "chat" else 0.1 + n / 100, "ifd_ppl": 1.0, "n_answer_tokens": 3,
               "truncated": False, "context_truncated": False} for n, i in enumerate(instances)]
    write_parquet(scores, tmp_path / "score" / "scores" / "shard-00000.parquet", SCORE_SCHEMA)
    for quota, code_kept in ((0, 0), (2, 2)):
        cfg = UnifitConfig(data=DataConfig(path=str(data), group_by="kind"),
                           select=SelectConfig(ratio=0.2, min_per_leaf=quota, agreement_fraction=0))
        run_select(StageContext(cfg, tmp_path, "select"))
        report = json.loads((tmp_path / "select" / "report.json").read_text())
        assert report["group_by"] == "kind" and report["grouping"] == "data.group_by=kind"
        assert report["agreement"] == {"skipped": "select.agreement_fraction=0"}
        assert report["groups"] == {"chat": {"kept": 9 - code_kept, "total": 40}, "code": {"kept": code_kept, "total": 5}}


def test_the_command_line_composes() -> None:
    from conftest import compose_config

    cfg = compose_config(["+experiment=select_only", "data.path=mine.jsonl", "select.train_scorer=false",
                          "+model@scorer=tiny_random", "data.group_by=category", "select.min_per_leaf=20"])
    assert not cfg.select.train_scorer and cfg.scoring_model.name == "tiny_random" and cfg.data.group_by == "category"
    assert pipeline.active_stages(cfg) == ["generate", "score", "select"] and cfg.checks_scorer
    plain = compose_config(["+experiment=select_only"])
    assert plain.train.max_steps == -1 and plain.select.ratio == 0.06  # a real selection, not the demo's toy settings
