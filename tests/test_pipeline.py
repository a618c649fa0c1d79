"""Stage scheduling: finished stages are skipped, a changed setting reruns only what depends on it,
an interrupted stage keeps its partial shards, and stale outputs are removed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from unifit import pipeline
from unifit.config import STAGES, ModelConfig, SelectConfig, UnifitConfig, WandbConfig
from unifit.stage import StageContext, UserError


class Recorder:
    """Stage functions that write a shard per call and remember which stages ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_in: str | None = None

    def function(self, stage: str) -> Callable[[StageContext], dict[str, Any]]:
        def run(ctx: StageContext) -> dict[str, Any]:
            self.calls.append(stage)
            shards = sorted(ctx.out_dir.glob("shard-*.txt"))
            (ctx.out_dir / f"shard-{len(shards)}.txt").write_text(stage)
            if self.fail_in == stage:
                self.fail_in = None
                raise KeyboardInterrupt("killed mid-stage")
            return {"shards": len(shards) + 1}

        return run


@pytest.fixture()
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(pipeline, "_stage_function", rec.function)
    return rec


# what a stage that asked no model records about serving models
NO_MODELS = {"model_loads": 0, "engine_starts": 0, "models_served": 0, "model_load_seconds": 0, "model_startup_seconds": 0,
             "model_call_seconds": 0, "model_calls": 0, "completions_computed": 0, "completions_cached": 0}


def make_cfg(run_dir: Path, **overrides: Any) -> UnifitConfig:
    return UnifitConfig(run_dir=str(run_dir), wandb=WandbConfig(mode="disabled"), **overrides)


def test_rerun_skips_finished_stages(tmp_path: Path, recorder: Recorder) -> None:
    pipeline.run(make_cfg(tmp_path))
    assert recorder.calls == list(STAGES)
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings["stages"]) == set(STAGES)
    assert all(timings["stages"][s]["seconds"] >= 0 for s in STAGES)
    assert all(timings["stages"][s]["metrics"] == {"shards": 1, **NO_MODELS} for s in STAGES)  # serving counts: every stage
    recorder.calls.clear()
    pipeline.run(make_cfg(tmp_path))
    assert recorder.calls == []


def test_changed_setting_reruns_only_dependents(tmp_path: Path, recorder: Recorder) -> None:
    pipeline.run(make_cfg(tmp_path))
    recorder.calls.clear()
    pipeline.run(make_cfg(tmp_path, select=SelectConfig(ratio=0.1)))
    assert recorder.calls == ["select", "finetune", "evaluate", "report"]
    assert (tmp_path / "select" / "shard-0.txt").exists() and not (tmp_path / "select" / "shard-1.txt").exists()


def test_interrupted_stage_resumes_from_its_shards(tmp_path: Path, recorder: Recorder) -> None:
    recorder.fail_in = "score"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(make_cfg(tmp_path))
    assert recorder.calls == ["generate", "sample", "train_scorer", "score"]
    assert not (tmp_path / "score" / "manifest.json").exists()
    recorder.calls.clear()
    pipeline.run(make_cfg(tmp_path))
    assert recorder.calls == ["score", "select", "finetune", "evaluate", "report"]
    manifest = json.loads((tmp_path / "score" / "manifest.json").read_text())
    assert manifest["metrics"] == {"shards": 2, **NO_MODELS}  # the shard written before the kill was kept for the stage to reuse


def test_stale_partial_output_is_removed(tmp_path: Path, recorder: Recorder) -> None:
    recorder.fail_in = "select"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(make_cfg(tmp_path))
    pipeline.run(make_cfg(tmp_path, select=SelectConfig(ratio=0.2)))
    manifest = json.loads((tmp_path / "select" / "manifest.json").read_text())
    assert manifest["metrics"] == {"shards": 1, **NO_MODELS}


def test_subset_needs_finished_upstream(tmp_path: Path, recorder: Recorder) -> None:
    with pytest.raises(UserError, match="stages=\\[generate,select\\]"):
        pipeline.run(make_cfg(tmp_path, stages=["select"]))
    pipeline.run(make_cfg(tmp_path))
    recorder.calls.clear()
    with pytest.raises(UserError, match="`report` needs the output of `evaluate`"):  # evaluate would be stale
        pipeline.run(make_cfg(tmp_path, stages=["select", "report"], select=SelectConfig(ratio=0.5)))
    pipeline.run(make_cfg(tmp_path, stages=["select", "finetune"], select=SelectConfig(ratio=0.5)))
    assert recorder.calls == ["select", "finetune"]


def test_fingerprints_ignore_serving_details() -> None:
    base = pipeline.stage_fingerprints(UnifitConfig())
    tweaked = UnifitConfig()
    tweaked.backend.batch_size = 99
    tweaked.cluster.generation_actors = 7
    tweaked.train.checkpoint_every = 1
    tweaked.train.max_failures = 5
    assert pipeline.stage_fingerprints(tweaked) == base
    retried = UnifitConfig()
    retried.generate.max_retries = 5  # parse retries change what generation keeps: not a serving detail
    changed = pipeline.stage_fingerprints(retried)
    assert changed["generate"] != base["generate"] and changed["sample"] != base["sample"]


def test_shared_dir_computes_common_stages_once(tmp_path: Path, recorder: Recorder) -> None:
    shared = str(tmp_path / "shared")
    pipeline.run(make_cfg(tmp_path / "ratio_a", shared_dir=shared, select=SelectConfig(ratio=0.02)))
    recorder.calls.clear()
    pipeline.run(make_cfg(tmp_path / "ratio_b", shared_dir=shared, select=SelectConfig(ratio=0.04)))
    assert recorder.calls == ["select", "finetune", "evaluate", "report"]
    assert (tmp_path / "ratio_b" / "generate").resolve() == (tmp_path / "ratio_a" / "generate").resolve()
    timings = json.loads((tmp_path / "ratio_b" / "timings.json").read_text())
    assert timings["stages"]["score"]["shared"] is True and timings["stages"]["score"]["seconds"] >= 0


SHARED_STAGES = ["generate", "sample", "train_scorer", "score", "select"]
NO_CHECK = SelectConfig(agreement_fraction=0)  # without the scorer check, select does not read the base model
PER_MODEL_STAGES = ["finetune", "evaluate", "report"]


def test_fingerprints_follow_generator_and_scorer_not_the_base_model() -> None:
    writer, scorer = ModelConfig(name="writer"), ModelConfig(name="scorer")
    prints = {name: pipeline.stage_fingerprints(UnifitConfig(model=ModelConfig(name=name), generator=writer, scorer=scorer,
                                                             select=NO_CHECK))
              for name in ("a", "b")}
    assert all(prints["a"][s] == prints["b"][s] for s in SHARED_STAGES)
    assert all(prints["a"][s] != prints["b"][s] for s in PER_MODEL_STAGES)
    # the scorer check compares the shared scorer with each run's own model: select is then per model, scoring still shared
    checked = {name: pipeline.stage_fingerprints(UnifitConfig(model=ModelConfig(name=name), generator=writer, scorer=scorer))
               for name in ("a", "b")}
    assert [checked["a"][s] == checked["b"][s] for s in SHARED_STAGES] == [True, True, True, True, False]
    # unset = the base model, resolved before hashing: naming it explicitly changes nothing
    model = ModelConfig(name="a")
    assert pipeline.stage_fingerprints(UnifitConfig(model=model)) == \
        pipeline.stage_fingerprints(UnifitConfig(model=model, generator=model, scorer=model))
    other_scorer = pipeline.stage_fingerprints(UnifitConfig(model=model, generator=writer, scorer=model, select=NO_CHECK))
    assert [other_scorer[s] == prints["a"][s] for s in STAGES] == [True, True] + [False] * 6
    other_writer = pipeline.stage_fingerprints(UnifitConfig(model=model, generator=model, scorer=scorer, select=NO_CHECK))
    assert all(other_writer[s] != prints["a"][s] for s in STAGES)


def test_shared_dir_gives_models_one_generation_and_one_selection(tmp_path: Path, recorder: Recorder) -> None:
    """slurm/sweep.sh: a job runs generate..select into the store and ends; each model's job starts after it."""
    shared = dict(shared_dir=str(tmp_path / "shared"), generator=ModelConfig(name="writer"), scorer=ModelConfig(name="scorer"),
                  select=NO_CHECK)
    pipeline.run(make_cfg(tmp_path / "shared_run", model=ModelConfig(name="a"), stages=SHARED_STAGES, **shared))
    assert recorder.calls == SHARED_STAGES
    for name in ("a", "b"):
        recorder.calls.clear()
        pipeline.run(make_cfg(tmp_path / name, model=ModelConfig(name=name), **shared))
        assert recorder.calls == PER_MODEL_STAGES
        timings = json.loads((tmp_path / name / "timings.json").read_text())
        assert all(timings["stages"][s]["shared"] for s in SHARED_STAGES)
    for stage in SHARED_STAGES:
        assert (tmp_path / "a" / stage).resolve() == (tmp_path / "b" / stage).resolve() == (tmp_path / "shared_run" / stage).resolve()
    assert (tmp_path / "a" / "finetune").resolve() != (tmp_path / "b" / "finetune").resolve()


def test_editing_the_imported_data_file_reruns_from_generate(tmp_path: Path, recorder: Recorder) -> None:
    from unifit.config import DataConfig

    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = make_cfg(tmp_path / "run", data=DataConfig(path=str(data)), stages=["generate", "sample"])
    pipeline.run(cfg)
    pipeline.run(cfg)
    assert recorder.calls == ["generate", "sample"]
    data.write_text('{"instruction": "a", "output": "c"}\n')
    pipeline.run(cfg)
    assert recorder.calls == ["generate", "sample", "generate", "sample"]
    with pytest.raises(UserError, match="data.path"):
        pipeline.run(make_cfg(tmp_path / "run", data=DataConfig(path=str(tmp_path / "missing.jsonl"))))


def test_a_stage_reads_upstream_outputs_through_their_declared_names(tmp_path: Path) -> None:
    select = StageContext(UnifitConfig(), tmp_path, "select")
    with pytest.raises(UserError, match=r"generate/instances is missing: stage `select` reads the instances from stage "
                                        r"`generate`; run the generate stage first \(stages=\[generate,select\]\); or set data.path"):
        select.input("instances")
    (tmp_path / "generate" / "instances").mkdir(parents=True)
    assert select.input("instances") == tmp_path / "generate" / "instances"
    with pytest.raises(ValueError, match=r"stage `select` reads `sample` of stage `sample`, which is not among its upstream"):
        select.input("sample")  # its fingerprint would not follow the sample
    with pytest.raises(KeyError, match="no stage declares an output named 'instance'"):
        select.input("instance")
    # a folder output counts once it is complete; placeholders name the variant
    evaluate = StageContext(UnifitConfig(), tmp_path, "evaluate")
    model = pipeline.output_path(tmp_path, "finetuned_model", variant="pithy_ne")
    assert model == tmp_path / "finetune" / "pithy_ne" / "model"
    model.mkdir(parents=True)
    assert evaluate.optional_input("finetuned_model", variant="pithy_ne") is None
    (model / "config.json").write_text("{}")
    assert evaluate.optional_input("finetuned_model", variant="pithy_ne") == model
    # without a trained scorer, score reads no scorer model: asking for one is outside its upstream
    untrained = StageContext(UnifitConfig(select=SelectConfig(train_scorer=False)), tmp_path, "score")
    with pytest.raises(ValueError, match="not among its upstream"):
        untrained.input("scorer")


def test_reading_an_unfingerprinted_config_section_is_caught(tmp_path: Path) -> None:
    """The check the stage tests run after each stage (conftest.assert_fingerprinted_reads), on reads made by hand."""
    from conftest import assert_fingerprinted_reads, recording_context

    score = recording_context(UnifitConfig(), tmp_path, "score")
    assert score.cfg.scoring_model.name and score.cfg.select.max_tokens_per_batch and score.cfg.cluster.scoring_actors
    assert_fingerprinted_reads(score)
    assert score.cfg.select.ratio  # score's fingerprint holds select.max_tokens_per_batch, not the ratio
    with pytest.raises(AssertionError, match=r"stage `score` reads \['select.ratio'\], outside its fingerprinted sections"):
        assert_fingerprinted_reads(score)
    evaluate = recording_context(UnifitConfig(), tmp_path, "evaluate")
    assert evaluate.cfg.generate.dedup_threshold and evaluate.cfg.evaluate.num_test_questions
    assert_fingerprinted_reads(evaluate)
    assert evaluate.cfg.generate.max_retries
    with pytest.raises(AssertionError, match=r"reads \['generate.max_retries'\]"):
        assert_fingerprinted_reads(evaluate)


@pytest.mark.parametrize("field", ["cluster.scoring_actors", "train.checkpoint_every", "sample.fraction"])
def test_an_inherited_field_must_be_fingerprinted_upstream(monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    """`inherited` says an upstream stage's fingerprint holds the field: one that none holds (not fingerprinted at all,
    a serving detail, or held only by a stage that is not upstream: score does not follow the sample) is refused."""
    import dataclasses

    spec = pipeline.STAGE_SPECS["score"]
    monkeypatch.setitem(pipeline.STAGE_SPECS, "score", dataclasses.replace(spec, inherited=(field,)))
    untrained = UnifitConfig(select=SelectConfig(train_scorer=False))
    with pytest.raises(ValueError, match=rf"STAGE_SPECS\['score'\]: the inherited config field '{field}' is fingerprinted by no stage"):
        pipeline.stage_fingerprints(untrained)
    monkeypatch.setitem(pipeline.STAGE_SPECS, "score", dataclasses.replace(spec, inherited=("domain",)))
    pipeline.stage_fingerprints(untrained)  # generate holds it
