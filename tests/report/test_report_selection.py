"""Report pieces of the selection: kept/total per group, the scorer check, Table 1 for an untrained scorer; and the
command that compares two runs' full scorings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from unifit.config import ModelConfig, SelectConfig, UnifitConfig, VariantConfig, to_container
from unifit.records import write_parquet
from unifit.report.report import build_report, load_run, table1_rows
from unifit.selection.agreement import distribution, main as compare_main
from unifit.selection.score import SCORE_SCHEMA

CHECK = {"sample": 62, "paired": 61, "spearman": 0.8123, "top_k": 4, "top_overlap": 0.5, "top_both": 2,
         "top_scorer_only": 2, "top_reference_only": 2, "ifd_mean_scorer": 0.71, "ifd_mean_reference": 0.8,
         "scorer": "scorer (smollm2_135m, trained on the sample)", "reference": "tuned model (smollm2_135m)",
         "fraction": 0.02, "seconds": 12.5}


def write_run(run_dir: Path, *, train_scorer: bool, agreement: dict) -> None:
    cfg = UnifitConfig(model=ModelConfig(name="m"), variants=[VariantConfig("pithy", "pithy", False)],
                       select=SelectConfig(train_scorer=train_scorer))
    (run_dir / "select").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_container(cfg)))
    stages = {"score": {"seconds": 120.0}, "finetune": {"seconds": 60.0, "metrics": {"pithy_train_seconds": 60.0}}}
    if train_scorer:
        stages["train_scorer"] = {"seconds": 60.0}
    (run_dir / "timings.json").write_text(json.dumps({"stages": stages}))
    report = {"instances": 45, "kept": 9, "min_per_leaf": 2, "group_by": "kind",
              "coverage_before": {"chat": 40, "code": 5}, "coverage_after": {"chat": 9},
              "groups": {"chat": {"kept": 9, "total": 40}, "code": {"kept": 0, "total": 5}}, "agreement": agreement}
    (run_dir / "select" / "report.json").write_text(json.dumps(report))


def test_table1_select_time_is_scoring_alone_without_scorer_training(tmp_path: Path) -> None:
    write_run(tmp_path / "trained", train_scorer=True, agreement={"skipped": "x"})
    write_run(tmp_path / "untrained", train_scorer=False, agreement={"skipped": "x"})
    trained, untrained = (table1_rows(load_run(tmp_path / name)) for name in ("trained", "untrained"))
    assert trained[0][3:] == ["3.00", "1.00", "4.00"]  # (60 + 120) s select, 60 s train
    assert untrained[0][3:] == ["2.00", "1.00", "3.00"]  # 120 s of scoring only


def test_report_shows_groups_and_the_scorer_check(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, train_scorer=True, agreement=CHECK)
    (run / "select" / "agreement.png").write_bytes(b"\x89PNG fake")
    build_report([run], tmp_path / "out")
    page = (tmp_path / "out" / "report.md").read_text()
    assert "| chat | 9 | 40 | 22.5% |" in page and "| code | 0 | 5 | 0.0% |" in page
    assert "keeps nothing from code" in page and "data.group_by=kind" in page
    assert "| Spearman ρ | 0.8123 |" in page and "| top-4 overlap | 50.0% |" in page
    assert (tmp_path / "out" / "agreement.png").read_bytes() == b"\x89PNG fake"
    assert "![scorer IFD against the tuned model's IFD](agreement.png)" in page

    skipped = tmp_path / "skipped"
    write_run(skipped, train_scorer=False, agreement={"skipped": "the scorer is the model being tuned"})
    build_report([skipped], tmp_path / "out2")
    assert "Scorer check skipped: the scorer is the model being tuned." in (tmp_path / "out2" / "report.md").read_text()


def scores(values: list[float]) -> list[dict]:
    return [{"id": f"i{n}", "leaf_id": "l", "concept_path": ["d"], "cond_loss": 1.0, "direct_loss": 1.0, "ifd": v,
             "ifd_ppl": 1.0, "n_answer_tokens": 3, "truncated": math.isnan(v), "context_truncated": False}
            for n, v in enumerate(values)]


def test_distribution_by_hand() -> None:
    d = distribution(scores([0.5, 0.1, 0.9, 1.2, 0.3, math.nan]))
    assert d["scored"] == 5 and d["truncated"] == 1 and d["at_or_above_max_ifd"] == 1
    assert (d["min"], d["median"], d["max"]) == (0.1, 0.5, 1.2) and d["mean"] == pytest.approx(3.0 / 5)


def test_compare_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, values in (("a", [0.1, 0.2, 0.3, 0.4]), ("b", [0.4, 0.3, 0.2, 0.1])):
        write_parquet(scores(values), tmp_path / name / "score" / "scores" / "shard-00000.parquet", SCORE_SCHEMA)
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b"), "--ratio", "0.5", "--plot", str(tmp_path / "s.png")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["agreement"]["spearman"] == pytest.approx(-1.0) and printed["agreement"]["top_overlap"] == 0.0
    assert printed["ifd_a"]["max"] == 0.4 and (tmp_path / "s.png").stat().st_size > 5000
    assert compare_main([str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out)["ifd_a"]["scored"] == 4
    with pytest.raises(SystemExit):
        compare_main([str(tmp_path / "a"), str(tmp_path / "missing")])
