"""The report from hand-built run directories: tables, Table 1 minutes, embedded images, "not run" notes, sweeps."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import assert_fingerprinted_reads, recording_context

from unifit.config import ModelConfig, SelectConfig, UnifitConfig, VariantConfig, to_container
from unifit.evaluation.judge import aggregate
from unifit.report.__main__ import main
from unifit.report.report import build_report
from unifit.report.stage import run as report_stage

VARIANTS = [VariantConfig("pithy", "pithy", False), VariantConfig("all", "all", False),
            VariantConfig("pithy_ne", "pithy", True), VariantConfig("all_ne", "all", True)]


class Page(HTMLParser):
    """Tables (as rows of cell texts), image sources and "not run" notes of a report."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.notes: list[str] = []
        self._cell: list[str] | None = None
        self._note = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attributes["src"] or "")
        elif tag == "p" and attributes.get("class") == "not-run":
            self._note = True
            self.notes.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "p":
            self._note = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._note:
            self.notes[-1] += data


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    fig.savefig(path)
    plt.close(fig)


def _write(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def make_run(root: Path, name: str, *, model: str = "smollm2_135m", ratio: float = 0.06, pithy_ne_wins: int = 3,
             complete: bool = True) -> Path:
    """The files a finished smoke run leaves behind (or only the generate stage's when not `complete`)."""
    run_dir = root / name
    cfg = UnifitConfig(name=name, run_dir=str(run_dir), model=ModelConfig(name=model), variants=VARIANTS,
                       select=SelectConfig(ratio=ratio))
    _write(run_dir / "config.json", to_container(cfg))
    _png(run_dir / "generate" / "tree.png")
    _write(run_dir / "generate" / "report.json", {
        "tree": {"nodes": 10, "leaves": 6}, "instances": 40, "dedup": {"kept": 40, "near_duplicates": 2},
        "leaf_generation": {"leaf_calls": 7, "pairs_kept": 42, "too_short": 3, "truncated": 5, "refusal": 0, "truncated_question_lists": 1}})
    stages = {"generate": {"seconds": 30.0, "metrics": {}}}
    if complete:
        stages.update(train_scorer={"seconds": 120.0, "metrics": {}}, score={"seconds": 60.0, "metrics": {}},
                      select={"seconds": 1.0, "metrics": {}},
                      finetune={"seconds": 900.0, "metrics": {"pithy_train_seconds": 90.0, "all_train_seconds": 600.0,
                                                              "pithy_ne_train_seconds": 300.0, "all_ne_train_seconds": 630.0,
                                                              "all_rows_seconds": 60.0, "all_ne_rows_seconds": 0.0}})
        _png(run_dir / "select" / "ifd_hist.png")
        _write(run_dir / "select" / "report.json", {"instances": 40, "kept": 3, "ratio": ratio, "max_ifd": 1.0, "target": 3,
                                                    "reasons": {"kept_by_rank": 3, "kept_by_quota": 0, "dropped_truncated": 1,
                                                                "dropped_ifd_ge_max": 5, "dropped_rank": 31}})
        _write(run_dir / "evaluate" / "ifeval.json", {"n_prompts": 12, "max_new_tokens": 96, "models": {
            m: {"prompt_level_strict": 0.25 + i / 10, "inst_level_strict": 0.4, "prompt_level_loose": 0.3, "inst_level_loose": 0.5,
                "n_prompts": 12, "n_instructions_scored": 17, "per_type_strict": {}, "records": []}
            for i, m in enumerate(["native", "pithy_ne", "all"])}})
        votes = [["pithy_ne"] * 3] * pithy_ne_wins + [["native", "all", "pithy_ne"]] * (6 - pithy_ne_wins)
        judged = aggregate(votes, ["native", "pithy_ne", "all"], parse_failures=1, bootstrap_samples=200).to_dict()
        _write(run_dir / "evaluate" / "test_sets" / "vicuna" / "judge.json", {**judged, "judge": model, "missing_models": []})
        _write(run_dir / "evaluate" / "judge.json", {**judged, "judge": model, "missing_models": [],
                                                     "smoke_test_caveat": f"the judge is the judged base model itself ({model}); its verdicts are only a smoke test"})
        scores = {"scope": 6.0, "complexity": 5.0, "practicality": 7.0, "depth": 4.0, "clarity": 8.0, "correlation": 9.0}
        _write(run_dir / "evaluate" / "diversity.json", {
            "dimensions": list(scores), "draws": 2, "sample_size": 4, "judge": model, "retries": 0, "sources": {
                "unifit": {"n_instructions": 40, "draws": [scores, scores], "failures": 0, "failed_replies": [],
                           "mean": scores, "std": dict.fromkeys(scores, 0.5)},
                "self_instruct": {"n_instructions": 40, "draws": [], "failures": 2, "failed_replies": ["x", "y"]}}})
    _write(run_dir / "timings.json", {"stages": stages})
    return run_dir


def _page(out: Path) -> Page:
    page = Page((out / "report.html").read_text())
    for src in page.images:
        assert (out / src).is_file(), f"<img src={src!r}> does not exist next to report.html"
    return page


def _table1(page: Page) -> list[list[str]]:
    table = next(t for t in page.tables if t[0][:3] == ["model", "setting", "variant"])
    return table[1:]


def test_report_of_a_finished_run(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "demo")
    cfg = UnifitConfig(run_dir=str(run_dir), variants=VARIANTS)
    ctx = recording_context(cfg, run_dir, "report")
    metrics = report_stage(ctx)
    assert_fingerprinted_reads(ctx)
    out = run_dir / "report"
    page = _page(out)
    assert set(page.images) == {"tree.png", "ifd_hist.png", "win_rates.png", "diversity_radar.png", "funnel.png"}
    assert metrics == {"runs": 1, "images": 5, "notes": len(page.notes)}
    rows = {row[1]: row for row in _table1(page)}
    # select = (120 + 60) s = 3 min for Pithy settings, 0 for All; train = the run + the rows it built; all = select + train
    assert rows["Pithy"][3:] == ["3.00", "1.50", "4.50"]
    assert rows["All"][3:] == ["0.00", "11.00", "11.00"]
    assert rows["Pithy NE"][2:] == ["pithy_ne", "3.00", "5.00", "8.00"]
    assert rows["All NE"][3:] == ["0.00", "10.50", "10.50"]
    win, vicuna = [t for t in page.tables if t[0][:2] == ["model", "win rate (majority of 3 orderings)"]]
    assert win[2][:2] == ["pithy_ne", "50.0%"] and win[4][:2] == ["no majority", "50.0%"] and vicuna == win
    ifeval = next(t for t in page.tables if t[0][:2] == ["model", "prompt-level strict"])
    assert ifeval[1:] == [["native", "25.0%", "40.0%", "30.0%", "50.0%"], ["pithy_ne", "35.0%", "40.0%", "30.0%", "50.0%"],
                          ["all", "45.0%", "40.0%", "30.0%", "50.0%"]]
    counts = next(t for t in page.tables if t[0][0] == "generation / filter count")
    assert ["leaf_generation.too_short", "3"] in counts
    headings = re.findall(r"<h2>(.*?)</h2>", (out / "report.html").read_text())
    assert headings.index("Figure 4 — judge win rate") < headings.index("Table 1 — time per model and setting") < len(headings) - 1
    assert "<details><summary>All generate counters" in (out / "report.html").read_text()
    diversity = next(t for t in page.tables if t[0][0] == "source")
    assert diversity[1][1] == "6.00 ± 0.50" and diversity[2][-1] == "2"
    assert any("smoke test" in note for note in page.notes)
    assert any("ratio curve" in note for note in page.notes)  # a single run: Figure 5 is "not run"
    markdown = (out / "report.md").read_text()
    assert "| smollm2_135m | Pithy NE | pithy_ne | 3.00 | 5.00 | 8.00 |" in markdown
    assert "![Figure 4: win rates](win_rates.png)" in markdown


def test_report_of_a_partial_run_says_not_run(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "partial", complete=False)
    build_report([run_dir], tmp_path / "out")
    page = _page(tmp_path / "out")
    assert page.images == ["funnel.png", "tree.png"]
    text = " ".join(page.notes)
    for missing in ("ifd_hist.png", "judge.json", "diversity.json"):
        assert missing in text
    assert all(row[3:] == ["not run"] * 3 for row in _table1(page))


def test_cli_aggregates_a_multi_model_sweep_and_a_ratio_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [make_run(tmp_path, f"ratio_{r}", ratio=r, pithy_ne_wins=w) for r, w in ((0.02, 1), (0.06, 4), (0.10, 2))]
    runs.append(make_run(tmp_path, "mistral", model="mistral_7b"))
    out = tmp_path / "sweep_report"
    assert main([str(r) for r in runs] + ["--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = _page(out)
    assert "ratio_curve.png" in page.images and "win_rates.png" in page.images
    assert "smollm2_135m__ratio_0.02_-tree.png" in page.images and "mistral_7b-tree.png" in page.images
    models = {row[0] for row in _table1(page)}
    assert models == {"smollm2_135m (ratio_0.02)", "smollm2_135m (ratio_0.06)", "smollm2_135m (ratio_0.1)", "mistral_7b"}
    curve = next(t for t in page.tables if t[0][:2] == ["model", "select.ratio"])
    pithy = [row for row in curve[1:] if row[0] == "smollm2_135m: pithy_ne"]
    assert [(row[1], row[2]) for row in pithy] == [("0.02", "16.7%"), ("0.06", "66.7%"), ("0.1", "33.3%")]


def test_cli_rejects_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_funnel_steps_follow_the_counters(tmp_path: Path) -> None:
    from unifit.report.report import funnel_steps, load_run

    steps = funnel_steps(load_run(make_run(tmp_path, "demo")))
    assert steps == [
        ("question–answer pairs generated", 50, False), ("answer cut off at the token limit", 5, True), ("answer too short", 3, True),
        ("kept by the filters", 42, False), ("near-duplicates", 2, True), ("after deduplication (training data 'All')", 40, False),
        ("scored by IFD", 40, False), ("too long to score", 1, True), ("IFD ≥ 1.0 (answer does not help)", 5, True),
        ("below the Pithy ratio", 31, True), ("Pithy (top 6% by IFD)", 3, False)]
