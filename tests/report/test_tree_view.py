"""The concept tree outline: per-node totals checked against a count made here, and the PNG dropped for big trees."""

from __future__ import annotations

import math
import random
import re
from html.parser import HTMLParser
from pathlib import Path

from unifit.concept_tree import Node, Tree
from unifit.records import write_parquet
from unifit.report.report import build_report
from unifit.report.tree_view import PNG_MAX_LEAVES, node_stats, tree_outline
from unifit.stage import write_json


def build_tree(scopes: int, children: int) -> Tree:
    """domain -> scopes -> `children` leaves each."""
    root = Node("cyber", ["cyber"], None, status="expanded")
    nodes = {root.id: root}
    for s in range(scopes):
        scope = Node(f"Scope{s}", ["cyber", f"Scope{s}"], root.id, status="expanded")
        nodes[scope.id] = scope
        root.children.append(scope.id)
        for c in range(children):
            leaf = Node(f"Leaf{s}.{c}", scope.path + [f"Leaf{s}.{c}"], scope.id)
            nodes[leaf.id] = leaf
            scope.children.append(leaf.id)
    return Tree("cyber", nodes)


def write_run(run_dir: Path, tree: Tree, seed: int = 0) -> list[dict]:
    """Instances (only the columns the outline reads), scores with a few truncated, and a kept subset."""
    rng = random.Random(seed)
    leaves = [n for n in tree.nodes.values() if not n.children]
    rows: list[dict] = []
    for k, leaf in enumerate(leaves * 3):
        for j in range(1 + k % 2):
            rows.append({"id": f"i{k}.{j}", "leaf_id": leaf.id, "ifd": rng.random() if len(rows) % 7 else math.nan})
    write_json(run_dir / "generate" / "tree.json", tree.to_json())
    write_parquet([{"id": r["id"], "leaf_id": r["leaf_id"]} for r in rows], run_dir / "generate" / "instances" / "shard-00000.parquet")
    write_parquet([{"id": r["id"], "leaf_id": r["leaf_id"], "ifd": r["ifd"]} for r in rows], run_dir / "score" / "scores" / "shard-00000.parquet")
    write_parquet([{"id": r["id"], "leaf_id": r["leaf_id"]} for r in rows if r["ifd"] > 0.5], run_dir / "select" / "pithy.parquet")
    return rows


def test_totals_per_node_equal_a_direct_count(tmp_path: Path) -> None:
    tree = build_tree(scopes=2, children=3)
    rows = write_run(tmp_path, tree)
    stats = node_stats(tmp_path, tree)
    for node in tree.nodes.values():
        under = [r for r in rows if tree.nodes[r["leaf_id"]].path[: len(node.path)] == node.path]
        finite = [r["ifd"] for r in under if math.isfinite(r["ifd"])]
        assert stats[node.id].instances == len(under)
        assert stats[node.id].kept == sum(r["ifd"] > 0.5 for r in under)
        assert math.isclose(stats[node.id].mean_ifd, sum(finite) / len(finite))
    assert stats[tree.root.id].instances == len(rows)


class Outline(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.details = self.open = self.leaves = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "details":
            self.details += 1
            self.open += "open" in attributes
        if tag == "div" and attributes.get("class") == "leaf":
            self.leaves += 1


def test_a_big_tree_is_an_outline_without_picture(tmp_path: Path) -> None:
    scopes, children = 5, 40  # 200 leaves: above what a picture can label
    assert scopes * children > PNG_MAX_LEAVES
    tree = build_tree(scopes, children)
    rows = write_run(tmp_path / "run", tree)
    (tmp_path / "run" / "generate" / "tree.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    build_report([tmp_path / "run"], tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    outline = Outline(page)
    assert outline.details == 1 + scopes and outline.leaves == scopes * children
    assert outline.open == 1 + scopes  # domain and scopes open; leaves are one click below
    assert "tree.png" not in page and not (tmp_path / "report" / "tree.png").exists()
    root_line = re.search(r"<summary>(.*?)</summary>", page).group(1)
    assert f"{len(rows):,} instances" in root_line and f"{scopes * children:,} leaves" in root_line
    assert "[tree.html](tree.html)" in (tmp_path / "report" / "report.md").read_text()
    assert Outline((tmp_path / "report" / "tree.html").read_text()).leaves == scopes * children


def test_a_small_tree_keeps_its_picture_and_imported_data_has_no_outline(tmp_path: Path) -> None:
    tree = build_tree(scopes=2, children=2)
    write_run(tmp_path / "run", tree)
    (tmp_path / "run" / "generate" / "tree.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    build_report([tmp_path / "run"], tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "tree.png" in page and Outline(page).leaves == 4
    assert tree_outline(tmp_path / "no_tree", tmp_path, "tree.html") is None
