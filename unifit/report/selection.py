"""Report blocks for what a selection kept and how far its scorer can be trusted.

Two pieces, both read from `select/report.json`: kept/total per group (concept-tree scopes, or the
`data.group_by` column of imported data), and the scorer check — Spearman correlation and top-`ratio` overlap
between the scorer's IFD and the tuned model's on a random sample, with the scatter plot the select stage drew.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from unifit.pipeline import output_path

if TYPE_CHECKING:
    from unifit.report.report import Block


def group_blocks(select_report: dict[str, Any]) -> list["Block"]:
    """kept / total per group; an older report without `groups` is derived from its coverage counts."""
    groups = select_report.get("groups") or {
        name: {"kept": select_report.get("coverage_after", {}).get(name, 0), "total": total}
        for name, total in select_report.get("coverage_before", {}).items()}
    if not groups:
        return []
    by = select_report.get("group_by")
    grouping = select_report.get("grouping") or (f"data.group_by={by}" if by else "concept-tree scope")
    rows = [[name, str(g["kept"]), str(g["total"]), f"{g['kept'] / g['total']:.1%}" if g["total"] else "—"]
            for name, g in sorted(groups.items())]
    lost = [name for name, g in groups.items() if g["total"] and not g["kept"]]
    blocks: list[Block] = [("p", f"Kept / total per group ({grouping}; "
                                 f"select.min_per_leaf={select_report.get('min_per_leaf', 0)})."),
                           ("table", ["group", "kept", "total", "kept %"], rows)]
    if lost:
        blocks.append(("note", f"The selection keeps nothing from {', '.join(sorted(lost))}; raise select.min_per_leaf "
                               "to protect small groups."))
    return blocks


def agreement_blocks(select_report: dict[str, Any], picture: Path, out_dir: Path, prefix: str) -> list["Block"]:
    """The scorer check: numbers, and the scatter plot `picture` copied next to the report."""
    check: Optional[dict[str, Any]] = select_report.get("agreement")
    if not check:
        return [("note", "Scorer check not run: this select/report.json predates it.")]
    if "skipped" in check:
        return [("p", f"Scorer check skipped: {check['skipped']}.")]
    rho = check.get("spearman")
    blocks: list[Block] = [
        ("p", f"Scorer check: {check['scorer']} against the {check['reference']} on a random sample of "
              f"{check['sample']} instances ({check['paired']} scored by both). Spearman ρ of the two IFD rankings "
              f"{'n/a' if rho is None else f'{rho:.3f}'}; of the top {check['top_k']} (select.ratio) each would select, "
              f"{check['top_both']} are the same ({check['top_overlap']:.0%} overlap). Superfiltering reports 28–49% "
              "overlap and ρ 0.68–0.80 between GPT-2 and LLaMA2-7B scorers."),
        ("table", ["scorer check", "value"], [
            ["sample / scored by both", f"{check['sample']} / {check['paired']}"],
            ["Spearman ρ", "n/a" if rho is None else f"{rho:.4f}"],
            [f"top-{check['top_k']} overlap", f"{check['top_overlap']:.1%}"],
            ["mean IFD scorer / tuned model", f"{check['ifd_mean_scorer']:.4f} / {check['ifd_mean_reference']:.4f}"
             if check.get("ifd_mean_scorer") is not None else "n/a"],
            ["check time (s, not part of selection time)", f"{check['seconds']:.1f}"],
        ]),
    ]
    if picture.exists():
        name = f"{prefix}agreement.png"
        shutil.copyfile(picture, out_dir / name)
        blocks.append(("img", name, "scorer IFD against the tuned model's IFD"))
    return blocks


def selection_blocks(run_dir: Path, select_report: Optional[dict[str, Any]], out_dir: Path, prefix: str) -> list["Block"]:
    """Both pieces for one run (nothing when the select stage has not run: the section already says so)."""
    if select_report is None:
        return []
    return group_blocks(select_report) + agreement_blocks(select_report, output_path(run_dir, "agreement_figure"), out_dir, prefix)
