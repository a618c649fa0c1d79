"""Training stages: finished variant models are reused on rerun (resume), train time is summed per variant,
and missing upstream data is a user error naming the file. (Training itself: test_sft.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_fingerprinted_reads, recording_context

from unifit.config import ModelConfig, UnifitConfig, VariantConfig
from unifit.records import Instance, write_instances
from unifit.stage import StageContext, UserError, write_json
from unifit.training.stage import run_finetune, run_scorer


def _finished(out_dir: Path, seconds: float) -> None:
    """What run_sft leaves behind: the exported model directory, then its metrics file."""
    (out_dir / "model").mkdir(parents=True)
    write_json(out_dir / "model" / "config.json", {"model_type": "llama"})
    write_json(out_dir / "metrics.json", {"train_seconds": seconds, "steps": 3, "final_loss": 1.5, "tokens": 100.0})


def test_finetune_reuses_complete_variants_and_sums_train_time(tmp_path: Path) -> None:
    cfg = UnifitConfig(variants=[VariantConfig(name="pithy_ne", data="pithy", neftune=True),
                                 VariantConfig(name="all", data="all", neftune=False)])
    logged: list[dict] = []
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, name="finetune", log_metrics=logged.append)
    _finished(ctx.out_dir / "pithy_ne", 12.0)
    _finished(ctx.out_dir / "all", 30.0)
    metrics = run_finetune(ctx)  # no upstream data needed: nothing is retrained
    assert metrics["reused"] == 2
    assert metrics["train_seconds"] == pytest.approx(42.0)
    assert metrics["pithy_ne_train_seconds"] == 12.0 and metrics["all_steps"] == 3
    assert logged[1]["finetune/all/train_seconds"] == 30.0


def test_missing_upstream_data_names_the_file(tmp_path: Path) -> None:
    cfg = UnifitConfig(variants=[VariantConfig(name="pithy", data="pithy", neftune=False)])
    with pytest.raises(UserError, match="select/pithy.parquet is missing"):
        run_finetune(StageContext(cfg=cfg, run_dir=tmp_path, name="finetune"))
    with pytest.raises(UserError, match="sample/sample.parquet is missing"):
        run_scorer(StageContext(cfg=cfg, run_dir=tmp_path, name="train_scorer"))


def test_scorer_trains_from_scorer_and_variants_from_the_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import unifit.training.sft as sft

    trained: dict[str, str] = {}

    def fake_sft(cfg: UnifitConfig, instances: list, out_dir: Path, *, neftune_alpha: float, model_cfg: ModelConfig,
                 rows_dir: Path | None = None) -> dict:
        trained[out_dir.name] = model_cfg.name
        _finished(out_dir, 1.0)
        return {"train_seconds": 1.0}

    monkeypatch.setattr(sft, "run_sft", fake_sft)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    write_instances([Instance(messages, "leaf", ["cyber", "leaf"], "concept_tree", "writer")], tmp_path / "sample" / "sample.parquet")
    write_instances([Instance(messages, "leaf", ["cyber", "leaf"], "concept_tree", "writer")], tmp_path / "select" / "pithy.parquet")
    cfg = UnifitConfig(model=ModelConfig(name="base"), scorer=ModelConfig(name="shared_scorer"),
                       variants=[VariantConfig(name="pithy", data="pithy", neftune=False)])
    for stage, run in (("train_scorer", run_scorer), ("finetune", run_finetune)):
        ctx = recording_context(cfg, tmp_path, stage)
        run(ctx)
        assert_fingerprinted_reads(ctx)
    assert trained == {"train_scorer": "shared_scorer", "pithy": "base"}
