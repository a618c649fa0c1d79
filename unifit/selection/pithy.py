"""Pithy selection: keep the `ratio` of all instances whose instructions matter most (highest IFD < max_ifd).

Rules, in order: instances whose answer could not fit (`truncated`) and those with IFD >= max_ifd (the
instruction does not help predict the answer) are dropped; a `min_per_leaf` quota first takes each
leaf's best eligible instances so no branch of the tree vanishes; the rest of the budget
(round(ratio x all instances)) goes to the highest IFD overall. Ties break by id, so the result is
deterministic. Every instance lands in exactly one reason bucket of the report.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from unifit.figures import pyplot, save_figure


@dataclass(frozen=True)
class Selection:
    kept_ids: list[str]  # IFD descending
    reasons: dict[str, int]  # kept_by_rank, kept_by_quota, dropped_truncated, dropped_ifd_ge_max, dropped_rank
    target: int  # round(ratio x all), at least 1


def scope_of(concept_path: Sequence[str]) -> str:
    """concept_path = [domain, scope, ...]; imported data have only [file stem], which then is the scope."""
    return concept_path[1] if len(concept_path) > 1 else (concept_path[0] if concept_path else "")


def _eligible(row: dict[str, Any], max_ifd: float) -> str | None:
    """None if selectable, else the drop reason."""
    if row["truncated"]:
        return "dropped_truncated"
    ifd = row["ifd"]
    if ifd is None or math.isnan(ifd) or ifd >= max_ifd:
        return "dropped_ifd_ge_max"
    return None


def select_pithy(scores: Sequence[dict[str, Any]], *, ratio: float, max_ifd: float, min_per_leaf: int = 0) -> Selection:
    """Apply the selection rules to score rows (id, leaf_id, ifd, truncated)."""
    target = max(1, round(ratio * len(scores))) if scores else 0
    reasons: Counter[str] = Counter()
    eligible: list[dict[str, Any]] = []
    for row in scores:
        reason = _eligible(row, max_ifd)
        if reason:
            reasons[reason] += 1
        else:
            eligible.append(row)
    ranked = sorted(eligible, key=lambda row: (-row["ifd"], row["id"]))
    rank_ids = {row["id"] for row in ranked[:target]}
    quota: list[dict[str, Any]] = []
    per_leaf: dict[str, int] = defaultdict(int)
    for row in ranked:
        if per_leaf[row["leaf_id"]] < min_per_leaf:
            per_leaf[row["leaf_id"]] += 1
            quota.append(row)
    kept = {row["id"] for row in quota}
    for row in ranked:
        if len(kept) >= target:
            break
        kept.add(row["id"])
    kept_ids = [row["id"] for row in ranked if row["id"] in kept]
    reasons["kept_by_quota"] = sum(1 for i in kept_ids if i not in rank_ids)
    reasons["kept_by_rank"] = len(kept_ids) - reasons["kept_by_quota"]
    reasons["dropped_rank"] = len(eligible) - len(kept_ids)
    for name in ("dropped_truncated", "dropped_ifd_ge_max"):
        reasons.setdefault(name, 0)
    return Selection(kept_ids, dict(reasons), target)


def count_groups(groups: Iterable[str]) -> dict[str, int]:
    """How many of each group, sorted by group name (the report's coverage tables)."""
    return dict(sorted(Counter(groups).items()))


def plot_ifd_histogram(scores: Sequence[dict[str, Any]], kept_ids: set[str], max_ifd: float, path: Path) -> Path:
    """IFD of every scored instance, kept ones highlighted, with the max_ifd cut-off marked."""
    plt = pyplot()

    values = [row["ifd"] for row in scores if not row["truncated"] and math.isfinite(row["ifd"])]
    kept = [row["ifd"] for row in scores if row["id"] in kept_ids]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = 40 if values else 1
    ax.hist(values, bins=bins, color="#9bb", label=f"scored ({len(values)})")
    ax.hist(kept, bins=bins, range=(min(values), max(values)) if values else None, color="#c53",
            label=f"Pithy ({len(kept)})")
    ax.axvline(max_ifd, color="k", linestyle="--", linewidth=1, label=f"max_ifd = {max_ifd:g}")
    ax.set_xlabel("IFD (cond loss / direct loss)")
    ax.set_ylabel("instances")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
