"""The run report: results first (win rates, IFEval, diversity, Table 1, Figure 5), then the data's path.

One or more finished run directories (a single run, a multi-model sweep, a ratio sweep) become one
`report.html` and `report.md` built from the same list of sections, with every picture copied or
drawn next to them (relative paths). The data's path is one funnel figure per run (generated →
filtered, by reason → deduplicated → scored → Pithy); the raw stage counters are folded into
collapsible sections. Whatever a run lacks — a stage that did not run — becomes a visible "not run"
note naming the missing file, never a crash.
"""

from __future__ import annotations

import html
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from unifit.atomic import write_text_atomic
from unifit.config import ConfigError, UnifitConfig, VariantConfig, from_container
from unifit.pipeline import output_path
from unifit.report.plots import plot_diversity_radar, plot_funnel, plot_ratio_curve, plot_win_rates
from unifit.report.selection import selection_blocks
from unifit.report.tree_view import TREE_CSS, tree_outline
from unifit.stage import read_json

log = logging.getLogger(__name__)

SETTINGS: tuple[str, ...] = ("Pithy", "All", "Pithy NE", "All NE")  # Table 1 columns of the paper

# A report is a list of sections; each block renders to both HTML and Markdown:
# ("p", text), ("note", text), ("img", file, alt), ("table", header, rows), ("details", summary, header, rows),
# ("html", markup escaped by its producer, markdown).
Block = Union[tuple[str, str], tuple[str, list[str], list[list[str]]], tuple[str, str, str], tuple[str, str, list[str], list[list[str]]]]
REJECT_LABELS = {  # generate-stage filter counters -> what a reader understands
    "truncated": "answer cut off at the token limit", "empty": "empty question or answer", "refusal": "answer refuses",
    "wrong_language": "not in the prompt's language", "too_short": "answer too short", "too_long": "answer too long",
}


@dataclass
class RunData:
    """What one run directory holds (None = the file is missing)."""

    run_dir: Path
    label: str
    cfg: Optional[UnifitConfig]
    timings: Optional[dict[str, Any]]
    generate_report: Optional[dict[str, Any]]
    select_report: Optional[dict[str, Any]]
    judge: Optional[dict[str, Any]]
    diversity: Optional[dict[str, Any]]
    ifeval: Optional[dict[str, Any]] = None
    test_sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # user test set name -> its judge.json
    notes: list[str] = field(default_factory=list)


def _read(path: Path, notes: list[str]) -> Optional[dict[str, Any]]:
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError as error:  # a broken file is reported, not fatal
        notes.append(f"{path} is not valid JSON ({error}); its section is left out")
        return None


def load_run(run_dir: Path, cfg: Optional[UnifitConfig] = None) -> RunData:
    """Read one run; the config comes from `cfg` or the pipeline's `<run_dir>/config.json`."""
    notes: list[str] = []
    if cfg is None:
        raw = _read(run_dir / "config.json", notes)
        if raw is None:
            notes.append(f"{run_dir / 'config.json'} is missing: variant settings and ratios are unknown")
        else:
            try:
                cfg = from_container(raw)
            except (ConfigError, TypeError) as error:
                notes.append(f"{run_dir / 'config.json'} does not match this version of unifit ({error})")
    return RunData(
        run_dir=run_dir,
        label=cfg.model.name if cfg else run_dir.name,
        cfg=cfg,
        timings=_read(run_dir / "timings.json", notes),
        generate_report=_read(output_path(run_dir, "generate_report"), notes),
        select_report=_read(output_path(run_dir, "select_report"), notes),
        judge=_read(output_path(run_dir, "judge"), notes),
        diversity=_read(output_path(run_dir, "diversity"), notes),
        ifeval=_read(output_path(run_dir, "ifeval"), notes),
        test_sets={path.parent.name: judged for path in sorted(output_path(run_dir, "test_sets").glob("*/judge.json"))
                   if (judged := _read(path, notes)) is not None},
        notes=notes,
    )


def setting_name(variant: VariantConfig) -> str:
    """Table 1 column of a variant: Pithy / All, plus " NE" when trained with NEFTune."""
    return ("Pithy" if variant.data == "pithy" else "All") + (" NE" if variant.neftune else "")


def _minutes(seconds: Optional[float]) -> str:
    return "not run" if seconds is None else f"{seconds / 60:.2f}"


def table1_rows(run: RunData) -> list[list[str]]:
    """Rows (model, setting, variant, select, train, all) in minutes, from measured stage times only.

    Select time = scoring-model training (none with select.train_scorer=false) + IFD scoring, charged to Pithy settings (All uses no
    selection); train time = that variant's fine-tuning and its training rows (tokenised and packed once per data, by
    the first variant on it; the others read them); all = select + train.
    """
    stages = (run.timings or {}).get("stages", {})
    variants = run.cfg.variants if run.cfg else []
    trained = run.cfg is None or run.cfg.select.train_scorer  # an untrained scorer: select time is scoring alone
    scorer = [stages.get(s, {}).get("seconds") for s in (("train_scorer", "score") if trained else ("score",))]
    select_seconds = None if None in scorer else sum(scorer)
    train = stages.get("finetune", {}).get("metrics", {})
    rows: list[list[str]] = []
    for setting in SETTINGS:
        mine = [v for v in variants if setting_name(v) == setting]
        if not mine:
            rows.append([run.label, setting, "—", "not run", "not run", "not run"])
        for variant in mine:
            train_seconds = train.get(f"{variant.name}_train_seconds")
            if train_seconds is not None:  # with building the variant's training rows (the first variant on its data builds them)
                train_seconds += train.get(f"{variant.name}_rows_seconds", 0.0)
            if variant.data == "pithy":
                select = select_seconds
            else:  # All needs no selection: 0 once it has trained, "not run" before
                select = None if train_seconds is None else 0.0
            total = None if select is None or train_seconds is None else select + train_seconds
            rows.append([run.label, setting, variant.name, _minutes(select), _minutes(train_seconds), _minutes(total)])
    return rows


def _flat(data: dict[str, Any], prefix: str = "") -> list[list[str]]:
    rows: list[list[str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flat(value, name + ".")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append([name, f"{value:.4g}" if isinstance(value, float) else str(value)])
    return rows


def _copy_image(source: Path, out_dir: Path, name: str) -> str:
    shutil.copyfile(source, out_dir / name)
    return name


def _prefix(run: RunData, many: bool) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run.label) + "-" if many else ""


def _caveats(runs: Sequence[RunData]) -> list[str]:
    found = []
    for run in runs:
        for payload in (run.judge, run.diversity):
            caveat = (payload or {}).get("smoke_test_caveat")
            if caveat and f"{run.label}: {caveat}" not in found:
                found.append(f"{run.label}: {caveat}")
    return found


def funnel_steps(run: RunData) -> list[tuple[str, int, bool]]:
    """(label, count, is_drop) from generated pairs to the Pithy selection, from the generate/select reports; [] without them."""
    report = run.generate_report or {}
    steps: list[tuple[str, int, bool]] = []
    if "leaf_generation" in report:
        counts = report["leaf_generation"]
        drops = [(REJECT_LABELS[key], int(counts.get(key, 0))) for key in REJECT_LABELS if counts.get(key)]
        kept = int(counts.get("pairs_kept", 0))
        steps.append(("question–answer pairs generated", kept + sum(n for _, n in drops), False))
        steps += [(label, n, True) for label, n in drops]
        steps.append(("kept by the filters", kept, False))
        near = int((report.get("dedup") or {}).get("near_duplicates", 0))
        steps += [("near-duplicates", near, True)] if near else []
        steps.append(("after deduplication (training data 'All')", int(report.get("instances", kept - near)), False))
    elif report.get("source") == "import":
        steps.append(("imported instances", int(report.get("instances", 0)), False))
    select = run.select_report or {}
    if "kept" in select:
        reasons = select.get("reasons", {})
        steps.append(("scored by IFD", int(select.get("instances", 0)), False))
        steps += [(label, int(reasons.get(key, 0)), True) for key, label in (
            ("dropped_truncated", "too long to score"), ("dropped_ifd_ge_max", f"IFD ≥ {select.get('max_ifd', 1)} (answer does not help)"),
            ("dropped_rank", "below the Pithy ratio")) if reasons.get(key)]
        steps.append((f"Pithy (top {select.get('ratio', 0):.0%} by IFD)", int(select["kept"]), False))
    return steps


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.1%}"


def _win_blocks(label: str, result: dict[str, Any], *, what: str) -> list[Block]:
    """The win-rate table with length and length control beside it, the judge's behaviour, and position bias."""
    models = result["models"]
    words = result.get("mean_answer_words", {})
    rows = [[m, _pct(result["win_rate"][m]), f"[{result['win_rate_ci'][m][0]:.1%}, {result['win_rate_ci'][m][1]:.1%}]",
             _pct(result.get("verdict_share", {}).get(m)), _pct(result.get("length_controlled_win_rate", {}).get(m)),
             f"{words[m]:.0f}" if m in words else "—"] for m in models]
    rows.append(["no majority", _pct(result["no_majority_rate"]),
                 f"[{result['no_majority_ci'][0]:.1%}, {result['no_majority_ci'][1]:.1%}]", "", "", ""])
    method = result.get("method", "text")
    how = ("the judge chose each verdict by its own probabilities (never unparseable)" if method == "probability" else
           f"free-text verdicts; unparseable: {result['parse_failures']} (after {result.get('retries', 0)} re-asks)")
    decisive = f"; decisiveness (mean probability of the chosen verdict) {result['decisiveness']:.0%}" if result.get("decisiveness") is not None else ""
    blocks: list[Block] = [
        ("p", f"{label}: {result['n_questions']} {what}, judge {result.get('judge', '?')}; {how}{decisive}; the three orderings "
              f"disagree (flip) on {result['flip_rate']:.0%} of questions; missing models: {result.get('missing_models') or 'none'}."),
        ("table", ["model", "win rate (majority of 3 orderings)", "95% CI", "verdict share", "length-controlled", "mean answer words"], rows),
    ]
    bias = result.get("position_bias") or {}
    if bias:
        k = len(models)
        blocks.append(("table", ["ordering", *[f"position {i} wins" for i in range(1, k + 1)]],
                       [[name, *[_pct(v) for v in shares]] for name, shares in bias.items()]))
    return blocks


def _ifeval_blocks(runs: Sequence[RunData]) -> list[Block]:
    from unifit.evaluation.ifeval import LEVELS

    blocks: list[Block] = []
    for run in runs:
        if not (run.ifeval and run.ifeval.get("models")):
            blocks.append(("note", f"Not run ({run.label}): {output_path(run.run_dir, 'ifeval')} is missing "
                                   f"(the evaluate stage has not run, or evaluate.ifeval_prompts=0)."))
            continue
        scored = run.ifeval["models"]
        rows = [[f"{run.label}: {m}" if len(runs) > 1 else m, *[_pct(r[level]) for level in LEVELS]] for m, r in scored.items()]
        first = next(iter(scored.values()))
        blocks.append(("p", f"{run.label}: the first {run.ifeval['n_prompts']} of Google's 541 IFEval prompts, answers of at most "
                            f"{run.ifeval['max_new_tokens']} tokens; {first['n_instructions_scored']} instructions checked by rule."))
        blocks.append(("table", ["model", "prompt-level strict", "instruction-level strict", "prompt-level loose", "instruction-level loose"], rows))
    return blocks


def build_sections(runs: Sequence[RunData], out_dir: Path) -> list[tuple[str, list[Block]]]:
    """All report sections, results first; images are copied/drawn into `out_dir` and referenced by relative name."""
    many = len(runs) > 1
    sections: list[tuple[str, list[Block]]] = []

    overview: list[Block] = [("table", ["run", "directory", "base model", "judge", "select.ratio"],
                              [[r.label, str(r.run_dir), r.cfg.model.name if r.cfg else "?",
                                (r.judge or {}).get("judge", "not run"), str(r.cfg.select.ratio) if r.cfg else "?"] for r in runs])]
    overview += [("note", caveat + ". Such a judge only checks that the pipeline runs end to end; use a strong judge "
                  "(judge=... with judge_backend=openai, e.g. GPT-4 or a `vllm serve`d 70B model) for results.") for caveat in _caveats(runs)]
    overview += [("note", note) for r in runs for note in r.notes]
    sections.append(("Runs", overview))

    judged = [(r.label, r.judge) for r in runs if r.judge and "win_rate" in r.judge]
    blocks: list[Block] = []
    if judged:
        blocks.append(("p", "Every answer set is judged in three orderings (forward, reverse, random); a model wins a question when "
                            "at least two verdicts name it. Verdict share counts single verdicts (probability-weighted); the "
                            "length-controlled value is that share at equal answer length (a logistic regression of the verdict "
                            "on the length difference, as in AlpacaEval's length control)."))
        blocks.append(("img", plot_win_rates(judged, out_dir / "win_rates.png").name, "Figure 4: win rates"))
        for label, result in judged:
            blocks += _win_blocks(label, result, what="generated domain test questions")
    for run in runs:
        if not (run.judge and "win_rate" in run.judge):
            reason = (run.judge or {}).get("skipped") or f"{output_path(run.run_dir, 'judge')} is missing (the evaluate stage has not run)"
            blocks.append(("note", f"Not run ({run.label}): {reason}."))
    sections.append(("Figure 4 — judge win rate", blocks))

    for name in sorted({name for r in runs for name in r.test_sets}):
        blocks = []
        for run in runs:
            result = run.test_sets.get(name)
            if result and "win_rate" in result:
                blocks += _win_blocks(run.label, result, what=f"questions of the test set {name}")
            else:
                blocks.append(("note", f"Not run ({run.label}): {(result or {}).get('skipped') or 'this run has no such test set'}."))
        sections.append((f"Test set {name} — judge win rate", blocks))

    sections.append(("IFEval — instruction following, scored by rules (no judge)", _ifeval_blocks(runs)))

    scored = [(r.label, r.diversity) for r in runs if r.diversity and r.diversity.get("sources")]
    blocks = []
    if scored:
        blocks.append(("img", plot_diversity_radar(scored, out_dir / "diversity_radar.png").name, "Figure 3: diversity"))
        for label, result in scored:
            dims = result["dimensions"]
            if result.get("method") == "probability":
                blocks.append(("p", f"{label}: each score is the expected score under the judge's probabilities over 1–10."))
            rows = [[f"{label}: {source}", *[f"{e['mean'][d]:.2f} ± {e['std'][d]:.2f}" if "mean" in e else "—" for d in dims],
                     str(len(e["draws"])), str(e["failures"])] for source, e in result["sources"].items()]
            blocks.append(("table", ["source", *dims, "draws", "failed draws"], rows))
    blocks += [("note", f"Not run ({r.label}): {output_path(r.run_dir, 'diversity')} is missing.")
               for r in runs if not (r.diversity and r.diversity.get("sources"))]
    sections.append(("Figure 3 — instruction diversity", blocks))

    table1: list[Block] = [("p", "Measured wall time in minutes (timings.json). select = scoring-model training (if any) + IFD scoring; "
                                 "train = the variant's fine-tuning, with building its training rows (variants on the same data share them: "
                                 "the first builds them); all = select + train. The All settings train on all data and need no selection.")]
    table1.append(("table", ["model", "setting", "variant", "select (min)", "train (min)", "all (min)"],
                   [row for r in runs for row in table1_rows(r)]))
    if any(r.timings is None for r in runs):
        table1 += [("note", f"Not run: {r.run_dir / 'timings.json'} is missing ({r.label}).") for r in runs if r.timings is None]
    sections.append(("Table 1 — time per model and setting", table1))

    sections.append(("Figure 5 — win rate vs. Pithy ratio", _ratio_blocks(runs, out_dir)))

    for run in runs:
        blocks = []
        steps = funnel_steps(run)
        if steps:
            name = f"{_prefix(run, many)}funnel.png"
            blocks.append(("img", plot_funnel(steps, f"From generated pairs to the Pithy selection — {run.label}", out_dir / name).name,
                           "data funnel"))
        else:
            blocks.append(("note", f"Not run: {output_path(run.run_dir, 'generate_report')} is missing (the generate stage has not run)."))
        outline = tree_outline(run.run_dir, out_dir, f"{_prefix(run, many)}tree.html")
        if outline is not None:
            blocks.append(("html", outline.html, outline.markdown))
        for stage, image, alt in (("generate", "tree_figure", "concept tree"), ("select", "ifd_histogram", "IFD histogram")):
            picture = output_path(run.run_dir, image)
            if stage == "generate" and outline is not None and not outline.png_readable:
                log.info("report: %s has too many leaves to draw; the outline replaces the picture", run.label)
            elif picture.exists():
                blocks.append(("img", _copy_image(picture, out_dir, f"{_prefix(run, many)}{picture.name}"), alt))
            else:
                blocks.append(("note", f"Not run: {picture} is missing (the {stage} stage has not run)."))
        for stage, counts, header in (("generate", run.generate_report, "generation / filter count"),
                                      ("select", run.select_report, "selection count")):
            counts_file = output_path(run.run_dir, f"{stage}_report")
            if counts is not None:
                blocks.append(("details", f"All {stage} counters ({counts_file})", [header, "value"], _flat(counts)))
            else:
                blocks.append(("note", f"Not run: {counts_file} is missing."))
            if stage == "select":
                blocks += selection_blocks(run.run_dir, counts, out_dir, _prefix(run, many))
        sections.append(("Data: concept tree, funnel and Pithy selection" + (f" — {run.label}" if many else ""), blocks))
    return sections


def _ratio_blocks(runs: Sequence[RunData], out_dir: Path) -> list[Block]:
    points = [(r, r.cfg.select.ratio) for r in runs if r.cfg and r.judge and "win_rate" in r.judge]
    if len({ratio for _, ratio in points}) < 2:
        return [("note", "Not run: the ratio curve needs evaluated runs at two or more select.ratio values. Run "
                         "`python -m unifit.launch -m +experiment=ratio_sweep`, then "
                         "`python -m unifit.report runs/ratio_sweep/* --out runs/ratio_sweep/report`.")]
    bases = {r.cfg.model.name for r, _ in points}
    series: dict[str, list[tuple[float, float, tuple[float, float]]]] = {}
    for run, ratio in points:
        for model in run.judge["models"]:
            label = model if len(bases) == 1 else f"{run.cfg.model.name}: {model}"
            series.setdefault(label, []).append((ratio, run.judge["win_rate"][model], tuple(run.judge["win_rate_ci"][model])))
    rows = [[label, f"{ratio:g}", f"{rate:.1%}", f"[{lo:.1%}, {hi:.1%}]"]
            for label, pts in sorted(series.items()) for ratio, rate, (lo, hi) in sorted(pts)]
    return [("img", plot_ratio_curve(series, out_dir / "ratio_curve.png").name, "Figure 5: win rate vs ratio"),
            ("table", ["model", "select.ratio", "win rate", "95% CI"], rows)]


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:.6em 0}"
        "details{margin:.6em 0}summary{cursor:pointer;color:#345}"
        "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}th{background:#eee}img{max-width:100%}"
        ".not-run{color:#8a5a00;background:#fff6e0;padding:4px 8px;border-left:3px solid #e0a000}")


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(title: str, sections: Sequence[tuple[str, list[Block]]]) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}{TREE_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            kind = block[0]
            if kind == "p":
                out.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "note":
                out.append(f"<p class='not-run'>{html.escape(block[1])}</p>")
            elif kind == "img":
                out.append(f"<p><img src='{html.escape(block[1])}' alt='{html.escape(block[2])}'></p>")
            elif kind == "details":
                out.append(f"<details><summary>{html.escape(block[1])}</summary>{_html_table(block[2], block[3])}</details>")
            elif kind == "html":
                out.append(block[1])
            else:
                out.append(_html_table(block[1], block[2]))
    out.append("</body></html>")
    return "\n".join(out)


def render_markdown(title: str, sections: Sequence[tuple[str, list[Block]]]) -> str:
    cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = [f"# {title}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "p":
                out += [block[1], ""]
            elif kind == "note":
                out += [f"> **Note:** {block[1]}", ""]
            elif kind == "img":
                out += [f"![{block[2]}]({block[1]})", ""]
            elif kind == "html":
                out += [block[2], ""]
            else:
                header, rows = (block[2], block[3]) if kind == "details" else (block[1], block[2])
                if kind == "details":
                    out += [f"<details><summary>{html.escape(block[1])}</summary>", ""]
                out.append("| " + " | ".join(cell(h) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
                out.append("")
                if kind == "details":
                    out += ["</details>", ""]
    return "\n".join(out)


def build_report(run_dirs: Sequence[Path], out_dir: Path, cfgs: Optional[Sequence[Optional[UnifitConfig]]] = None) -> dict[str, Any]:
    """Write report.html and report.md (+ images) for the runs into `out_dir`; return counts for the stage metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfgs = list(cfgs) if cfgs is not None else [None] * len(run_dirs)
    runs = [load_run(Path(d).resolve(), c) for d, c in zip(run_dirs, cfgs)]
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1:  # e.g. a ratio sweep of one model: tell runs apart by directory
            run.label = f"{run.label} ({run.run_dir.name})"
    sections = build_sections(runs, out_dir)
    title = "UNIFIT report — " + ", ".join(r.label for r in runs)
    for name, text in (("report.html", render_html(title, sections)), ("report.md", render_markdown(title, sections))):
        write_text_atomic(out_dir / name, text)
    images = sum(1 for _, blocks in sections for b in blocks if b[0] == "img")
    notes = sum(1 for _, blocks in sections for b in blocks if b[0] == "note")
    log.info("report: %s (%d images, %d notes)", out_dir / "report.html", images, notes)
    return {"runs": len(runs), "images": images, "notes": notes}
