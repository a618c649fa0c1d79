"""Does a cheap scorer pick the data the tuned model would? Rank agreement of two IFD scorings of the same instances.

Superfiltering (Li et al., ACL 2024) scores with GPT-2 instead of the 7B model and reports how its selection
relates to the big scorer's: Spearman correlation of the IFD values and the overlap of the selected subsets.
These are the same two numbers, computed on a random sample that both models score: Spearman over the
instances both scored (finite IFD), and the overlap of the two top-`ratio` sets, each chosen by the selection's
own rule (truncated and `ifd >= max_ifd` instances are not selectable).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Sequence

from unifit.figures import pyplot, save_figure
from unifit.fingerprint import fingerprint

MIN_INSTANCES = 50  # a rank correlation over fewer instances says little; small data sets are checked whole


def check_size(n_instances: int, fraction: float, max_instances: int) -> int:
    """Instances in the check sample: round(fraction x n), capped at max_instances, at least MIN_INSTANCES (or all)."""
    if fraction <= 0 or n_instances == 0:
        return 0
    return min(n_instances, max(MIN_INSTANCES, min(max_instances, round(fraction * n_instances))))


def check_sample(ids: Sequence[str], size: int, seed: int) -> list[str]:
    """`size` ids drawn uniformly, independent of input order (drawn from the sorted ids), sorted."""
    rng = random.Random(fingerprint(["agreement", seed]))
    return sorted(rng.sample(sorted(ids), size))


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (the convention Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the average ranks. NaN for fewer than 2 pairs or a constant side."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs paired values, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    mean = (len(a) + 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb))
    var_a = sum((x - mean) ** 2 for x in ra)
    var_b = sum((y - mean) ** 2 for y in rb)
    return cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else math.nan


def _selectable(row: dict[str, Any], max_ifd: float) -> bool:
    return not row["truncated"] and math.isfinite(row["ifd"]) and row["ifd"] < max_ifd


def top_set(rows: Sequence[dict[str, Any]], k: int, max_ifd: float) -> set[str]:
    """Ids of the k highest-IFD selectable rows (ties by id, as in select_pithy)."""
    ranked = sorted((r for r in rows if _selectable(r, max_ifd)), key=lambda r: (-r["ifd"], r["id"]))
    return {r["id"] for r in ranked[:k]}


def agreement(scorer: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]], *, ratio: float,
              max_ifd: float) -> dict[str, Any]:
    """Agreement of `scorer`'s IFD rows with `reference`'s (the tuned model's) on the same ids.

    top_k = max(1, round(ratio x sample)); overlap = |top(scorer) & top(reference)| / top_k, the fraction of the
    reference's picks the scorer also picks (Superfiltering's "overlap" of selected subsets).
    """
    by_id = {r["id"]: r for r in reference}
    missing = [r["id"] for r in scorer if r["id"] not in by_id]
    if missing or len(by_id) != len(scorer):
        raise ValueError(f"agreement needs the same instances scored by both models ({len(missing)} missing)")
    pairs = [(r["ifd"], by_id[r["id"]]["ifd"]) for r in scorer
             if not r["truncated"] and not by_id[r["id"]]["truncated"]
             and math.isfinite(r["ifd"]) and math.isfinite(by_id[r["id"]]["ifd"])]
    k = max(1, round(ratio * len(scorer)))
    top_scorer, top_reference = top_set(scorer, k, max_ifd), top_set(reference, k, max_ifd)
    both = len(top_scorer & top_reference)
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {
        "sample": len(scorer), "paired": len(pairs),
        "spearman": spearman([p[0] for p in pairs], [p[1] for p in pairs]),
        "top_k": k, "top_overlap": both / k, "top_both": both,
        "top_scorer_only": len(top_scorer - top_reference), "top_reference_only": len(top_reference - top_scorer),
        "ifd_mean_scorer": mean([p[0] for p in pairs]), "ifd_mean_reference": mean([p[1] for p in pairs]),
    }


def plot_agreement(scorer: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]], stats: dict[str, Any],
                   max_ifd: float, path: Path, *, scorer_label: str, reference_label: str) -> Path:
    """Scatter of the two IFDs per instance, coloured by which top-`ratio` set(s) it falls in, max_ifd marked."""
    plt = pyplot()

    by_id = {r["id"]: r for r in reference}
    top_scorer, top_reference = top_set(scorer, stats["top_k"], max_ifd), top_set(reference, stats["top_k"], max_ifd)
    groups: dict[str, tuple[list[float], list[float], str]] = {
        "selected by both": ([], [], "#c53"), "scorer only": ([], [], "#e90"), "reference only": ([], [], "#37a"),
        "neither": ([], [], "#bbb")}
    for row in scorer:
        other = by_id[row["id"]]
        if not (math.isfinite(row["ifd"]) and math.isfinite(other["ifd"])):
            continue
        name = ("selected by both" if row["id"] in top_scorer & top_reference else "scorer only" if row["id"] in top_scorer
                else "reference only" if row["id"] in top_reference else "neither")
        groups[name][0].append(other["ifd"])
        groups[name][1].append(row["ifd"])
    fig, ax = plt.subplots(figsize=(5, 4.6))
    for name, (xs, ys, color) in groups.items():
        if xs:
            ax.scatter(xs, ys, s=9, color=color, label=f"{name} ({len(xs)})", alpha=0.8, linewidths=0)
    ax.axvline(max_ifd, color="k", linestyle="--", linewidth=0.8)
    ax.axhline(max_ifd, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"IFD, {reference_label}")
    ax.set_ylabel(f"IFD, {scorer_label}")
    rho = stats["spearman"]
    ax.set_title(f"n={stats['paired']}, Spearman {rho:.3f}, top-{stats['top_k']} overlap {stats['top_overlap']:.0%}"
                 if math.isfinite(rho) else f"n={stats['paired']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def distribution(rows: Sequence[dict[str, Any]], max_ifd: float = 1.0) -> dict[str, Any]:
    """IFD distribution of scored rows: count, mean, quantiles, and how many the selection could not take."""
    values = sorted(r["ifd"] for r in rows if not r["truncated"] and math.isfinite(r["ifd"]))
    if not values:
        return {"scored": 0}
    quantile = lambda q: values[min(len(values) - 1, round(q * (len(values) - 1)))]  # noqa: E731  (nearest rank)
    return {"scored": len(values), "truncated": sum(bool(r["truncated"]) for r in rows),
            "mean": sum(values) / len(values), "min": values[0], "p10": quantile(0.1), "p25": quantile(0.25),
            "median": quantile(0.5), "p75": quantile(0.75), "p90": quantile(0.9), "max": values[-1],
            "at_or_above_max_ifd": sum(v >= max_ifd for v in values)}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m unifit.selection.agreement RUN_A [RUN_B] [--ratio R] [--max-ifd M]`: compare two runs' scorings.

    The select stage checks its scorer on a sample; this compares every instance two runs scored (e.g. a trained and
    an untrained scorer on the same data; a run still scoring counts with the instances it has finished), and prints
    both IFD distributions and the agreement as JSON. With one run, its IFD distribution alone.
    """
    import argparse
    import json

    from unifit.pipeline import output_path
    from unifit.records import read_parquet

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path, help="run directory whose score/scores/ plays the scorer")
    parser.add_argument("run_b", type=Path, nargs="?", help="run directory whose score/scores/ is the reference")
    parser.add_argument("--ratio", type=float, default=0.06, help="top fraction compared (select.ratio)")
    parser.add_argument("--max-ifd", type=float, default=1.0)
    parser.add_argument("--plot", type=Path, help="also draw the scatter plot here (PNG)")
    args = parser.parse_args(argv)
    scores = []
    for run in (args.run_a, args.run_b) if args.run_b else (args.run_a,):
        folder = output_path(run, "scores")
        if not folder.is_dir():
            parser.error(f"{folder} does not exist: give run directories whose score stage has run")
        scores.append(read_parquet(folder))
    if not args.run_b:
        print(json.dumps({"a": str(args.run_a), "ifd_a": distribution(scores[0], args.max_ifd)}, indent=2))
        return 0
    a, b = scores
    common = {r["id"] for r in a} & {r["id"] for r in b}
    a, b = [r for r in a if r["id"] in common], [r for r in b if r["id"] in common]
    stats = agreement(a, b, ratio=args.ratio, max_ifd=args.max_ifd)
    if args.plot:
        plot_agreement(a, b, stats, args.max_ifd, args.plot, scorer_label=str(args.run_a), reference_label=str(args.run_b))
    print(json.dumps({"a": str(args.run_a), "b": str(args.run_b), "ratio": args.ratio, "agreement": stats,
                      "ifd_a": distribution(a, args.max_ifd), "ifd_b": distribution(b, args.max_ifd)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
