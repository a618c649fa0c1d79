"""The concept tree in the report as a collapsible HTML outline: instances, Pithy kept and mean IFD per node.

A picture of 5,000 leaves is unreadable, so the report shows the tree as nested `<details>` elements — scopes
open, deeper levels one click away — each node labelled with the totals of the leaves below it. The PNG is kept
only for trees of at most `PNG_MAX_LEAVES` leaves. Counts come from the columns of the stage outputs (leaf ids and
scores), never from whole instances, so a 500K-instance run costs a few megabytes here.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from unifit.atomic import write_text_atomic
from unifit.concept_tree import Node, Tree
from unifit.pipeline import output_path
from unifit.records import parquet_files, read_column
from unifit.stage import read_json

PNG_MAX_LEAVES = 60  # beyond this the tree picture collapses levels and its labels overlap: the outline replaces it
OPEN_DEPTH = 1  # nodes up to this depth (the domain is 0) start expanded


@dataclass
class NodeStats:
    """Totals over the leaves under one node."""

    instances: int = 0
    kept: int = 0
    ifd_sum: float = 0.0
    ifd_count: int = 0  # instances with a finite IFD (truncated ones have none)

    @property
    def mean_ifd(self) -> Optional[float]:
        return self.ifd_sum / self.ifd_count if self.ifd_count else None

    def add(self, other: "NodeStats") -> None:
        self.instances += other.instances
        self.kept += other.kept
        self.ifd_sum += other.ifd_sum
        self.ifd_count += other.ifd_count


def _leaf_ids(path: Path) -> list[str]:
    return read_column(parquet_files(path), "leaf_id") if path.exists() else []


def node_stats(run_dir: Path, tree: Tree) -> dict[str, NodeStats]:
    """Per node id: its leaves' instances (generate), kept instances (select) and IFD (score), rolled up the tree."""
    leaves: dict[str, NodeStats] = defaultdict(NodeStats)
    for leaf in _leaf_ids(output_path(run_dir, "instances")):
        leaves[leaf].instances += 1
    for leaf in _leaf_ids(output_path(run_dir, "pithy")):
        leaves[leaf].kept += 1
    scores = output_path(run_dir, "scores")
    if scores.exists():
        files = parquet_files(scores)
        for leaf, ifd in zip(read_column(files, "leaf_id"), read_column(files, "ifd")):
            if ifd is not None and math.isfinite(ifd):
                leaves[leaf].ifd_sum += ifd
                leaves[leaf].ifd_count += 1
    totals: dict[str, NodeStats] = defaultdict(NodeStats)
    for leaf_id, stats in leaves.items():
        node = tree.nodes.get(leaf_id)
        while node is not None:
            totals[node.id].add(stats)
            node = tree.nodes.get(node.parent) if node.parent else None
    return totals


def _label(node: Node, stats: NodeStats, leaves: int) -> str:
    ifd = "–" if stats.mean_ifd is None else f"{stats.mean_ifd:.3f}"
    share = f" ({stats.kept / stats.instances:.1%})" if stats.instances else ""
    below = f"{leaves:,} leaves · " if leaves > 1 else ""
    return (f"<span class='concept'>{html.escape(node.concept)}</span> <span class='counts'>{below}{stats.instances:,} "
            f"instances · {stats.kept:,} kept{share} · IFD {ifd}</span>")


def render_outline(tree: Tree, stats: dict[str, NodeStats]) -> str:
    """Nested `<details>`: one per inner node, a plain line per leaf, children in generation order."""
    leaf_counts: dict[str, int] = {}

    def count(node: Node) -> int:
        leaf_counts[node.id] = sum(count(tree.nodes[c]) for c in node.children) if node.children else 1
        return leaf_counts[node.id]

    count(tree.root)
    out: list[str] = []

    def emit(node: Node, depth: int) -> None:
        label = _label(node, stats.get(node.id, NodeStats()), leaf_counts[node.id])
        if not node.children:
            out.append(f"<div class='leaf'>{label}</div>")
            return
        out.append(f"<details{' open' if depth <= OPEN_DEPTH else ''}><summary>{label}</summary><div class='children'>")
        for child in node.children:
            emit(tree.nodes[child], depth + 1)
        out.append("</div></details>")

    emit(tree.root, 0)
    return "<div class='tree'>" + "".join(out) + "</div>"


TREE_CSS = (".tree .children{margin-left:1.2em;border-left:1px solid #ddd;padding-left:.6em}"
            ".tree summary{cursor:pointer}.tree .leaf{margin-left:1em}.tree .counts{color:#555;font-size:90%}")


@dataclass(frozen=True)
class TreeOutline:
    html: str  # the outline, to embed in a page
    markdown: str  # a line linking the outline's own page
    png_readable: bool  # the tree is small enough for its picture


def tree_outline(run_dir: Path, out_dir: Path, name: str) -> Optional[TreeOutline]:
    """The run's concept tree as an outline, also written as its own page `out_dir/name`; None without a concept
    tree (imported data)."""
    tree_file = output_path(run_dir, "tree")
    if not tree_file.exists():
        return None
    tree = Tree.from_json(read_json(tree_file))
    outline = render_outline(tree, node_stats(run_dir, tree))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Concept tree — {html.escape(tree.domain)}</title>"
            f"<style>body{{font-family:sans-serif}}{TREE_CSS}</style></head><body>{outline}</body></html>")
    write_text_atomic(out_dir / name, page)
    leaves = sum(1 for node in tree.nodes.values() if not node.children)
    return TreeOutline(outline, f"Concept tree with instances, Pithy kept and mean IFD per node: [{name}]({name})",
                       leaves <= PNG_MAX_LEAVES)
