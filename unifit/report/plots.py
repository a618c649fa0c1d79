"""The paper's figures as PNG files: win rates with 95% intervals (Fig. 4), diversity radar (Fig. 3), win rate vs ratio (Fig. 5).

Each function takes the JSON the evaluate stage wrote (already loaded) and writes one PNG atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from unifit.figures import pyplot, save_figure


def plot_win_rates(panels: Sequence[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """One bar chart per (title, judge.json): win rate per model with its bootstrap 95% interval, and "no majority"."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 1.1 * max(len(j["models"]) + 1 for _, j in panels)) * len(panels), 3.6),
                             squeeze=False)
    for ax, (title, judged) in zip(axes[0], panels):
        names = list(judged["models"]) + ["no majority"]
        values = [judged["win_rate"][m] for m in judged["models"]] + [judged["no_majority_rate"]]
        intervals = [judged["win_rate_ci"][m] for m in judged["models"]] + [judged["no_majority_ci"]]
        errors = [[v - lo for v, (lo, _) in zip(values, intervals)], [hi - v for v, (_, hi) in zip(values, intervals)]]
        colors = [f"C{i}" for i in range(len(judged["models"]))] + ["0.7"]
        bars = ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=colors)
        bars[-1].set_hatch("//")
        for x, v in enumerate(values):
            ax.annotate(f"{v:.0%}", (x, v), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction of test questions")
        ax.set_title(f"{title}\nn={judged['n_questions']}, flip rate {judged['flip_rate']:.0%}", fontsize=9)
    fig.suptitle("Judge win rate (majority of 3 orderings), 95% bootstrap intervals", fontsize=10, y=1.06)
    return save_figure(fig, path)


def plot_diversity_radar(panels: Sequence[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """One radar per (title, diversity.json): mean score per dimension for each source, shaded mean ± std."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.6), subplot_kw={"projection": "polar"}, squeeze=False)
    for ax, (title, scored) in zip(axes[0], panels):
        dims = list(scored["dimensions"])
        angles = [2 * math.pi * i / len(dims) for i in range(len(dims))] + [0.0]
        for i, (source, entry) in enumerate(scored["sources"].items()):
            if "mean" not in entry:
                continue
            mean = [entry["mean"][d] for d in dims] + [entry["mean"][dims[0]]]
            std = [entry["std"][d] for d in dims] + [entry["std"][dims[0]]]
            ax.plot(angles, mean, color=f"C{i}", label=f"{source} ({len(entry['draws'])} draws)")
            ax.fill_between(angles, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=f"C{i}", alpha=0.2)
        ax.set_xticks(angles[:-1], dims, fontsize=8)
        ax.tick_params(axis="x", pad=8)
        ax.set_ylim(0, 10)
        ax.set_title(title, fontsize=9)
        unscored = [source for source, entry in scored["sources"].items() if "mean" not in entry]
        if unscored:  # say why a source is missing instead of leaving an empty plot
            ax.text(0.5, -0.18, f"no parseable judge scores for: {', '.join(unscored)}", transform=ax.transAxes,
                    ha="center", fontsize=7, color="firebrick")
        if len(unscored) < len(scored["sources"]):
            ax.legend(loc="lower right", fontsize=7, bbox_to_anchor=(1.25, -0.1))
    fig.suptitle("Instruction diversity (judge scores 1-10, mean ± std over draws)", fontsize=10, y=1.04)
    return save_figure(fig, path)


def plot_ratio_curve(series: dict[str, list[tuple[float, float, tuple[float, float]]]], path: Path) -> Path:
    """Win rate against the Pithy ratio: `series` maps a line label to (ratio, win rate, (ci low, ci high)) points."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (label, points) in enumerate(sorted(series.items())):
        points = sorted(points)
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        errors = [[y - p[2][0] for y, p in zip(ys, points)], [p[2][1] - y for y, p in zip(ys, points)]]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=f"C{i}", label=label)
    ax.set_xlabel("Pithy ratio (select.ratio)")
    ax.set_ylabel("judge win rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Win rate vs. selection ratio", fontsize=10)
    return save_figure(fig, path)


def plot_funnel(steps: Sequence[tuple[str, int, bool]], title: str, path: Path) -> Path:
    """The data's path as horizontal bars, top to bottom: (label, count, is_drop); drops are drawn hatched and indented."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(steps) + 0.9))
    top = max([count for _, count, _ in steps] + [1])
    for y, (label, count, drop) in enumerate(steps):
        ax.barh(y, count, color="#e8a0a0" if drop else "#4c72b0", hatch="//" if drop else None, height=0.7)
        ax.annotate(f"{count:,}", (count, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(steps)), [("    − " if drop else "") + label for label, _, drop in steps], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel("instructions (question–answer pairs)", fontsize=8)
    ax.set_title(title, fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return save_figure(fig, path)
