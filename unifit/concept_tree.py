"""The concept tree as data: nodes keyed by a hash of their concept path, walked in generation order.

Written by the generate stage (`generation/tree.py` expands it with the model) and read by evaluation (test
questions about its leaves) and the report (the outline). Node ids hash the concept path, so they are stable
across reruns and unique per branch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from unifit.fingerprint import fingerprint

EXPANDED, LEAF, ATOMIC, FAILED = "expanded", "leaf", "atomic", "failed"


def node_id(path: list[str]) -> str:
    return fingerprint(path)[:16]


@dataclass
class Node:
    concept: str
    path: list[str]  # [domain, scope, ..., concept]
    parent: Optional[str]
    children: list[str] = field(default_factory=list)
    status: str = LEAF  # expanded | leaf (depth reached) | atomic (no new sub-concepts) | failed (unparsable)

    @property
    def id(self) -> str:
        return node_id(self.path)

    @property
    def depth(self) -> int:
        return len(self.path) - 1


@dataclass
class Tree:
    domain: str
    nodes: dict[str, Node]  # insertion order = breadth-first generation order
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def root(self) -> Node:
        return self.nodes[node_id([self.domain])]

    def walk(self, start: Optional[Node] = None) -> Iterator[Node]:
        """Depth-first, children in generation order: the stable order leaves are processed and sharded in."""
        stack = [start or self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(self.nodes[c] for c in reversed(node.children))

    def leaves(self, start: Optional[Node] = None) -> list[Node]:
        return [n for n in self.walk(start) if not n.children and n.depth >= 1]

    def leaf_counts_per_scope(self) -> dict[str, int]:
        return {self.nodes[s].concept: len(self.leaves(self.nodes[s])) for s in self.root.children}

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "root": self.root.id,
            "counts": self.counts,
            "leaf_counts_per_scope": self.leaf_counts_per_scope(),
            "nodes": {nid: {"id": nid, **dataclasses.asdict(n)} for nid, n in self.nodes.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Tree":
        nodes = {nid: Node(n["concept"], n["path"], n["parent"], n["children"], n["status"]) for nid, n in data["nodes"].items()}
        return cls(data["domain"], nodes, dict(data.get("counts", {})))
