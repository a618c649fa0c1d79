"""Building the concept tree: root = domain, level 2 = the user's scopes, deeper levels asked of the model.

Expansion runs level by level so that each level is one batched generation call (spread over the Ray
actor pool). A node becomes a leaf when it reaches the configured depth, when its expansion still does not parse
after the bounded retries (counted as failed), or when the model offers no new sub-concept (atomic).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from unifit.concept_tree import ATOMIC, EXPANDED, FAILED, LEAF, Node, Tree
from unifit.config import GenerateConfig
from unifit.figures import pyplot, save_figure
from unifit.generation.parsing import concept_key, drop_cut_name, parse_list
from unifit.llm.asking import ask
from unifit.llm.base import ChatClient, GenerationParams

log = logging.getLogger(__name__)


def _add_child(tree: Tree, parent: Node, concept: str) -> Node:
    child = Node(concept, parent.path + [concept], parent.id)
    tree.nodes[child.id] = child
    parent.children.append(child.id)
    return child


def subconcept_conversation(gen: GenerateConfig, domain: str, node: Node, json_mode: bool) -> list[dict[str, str]]:
    prompt = gen.subconcept_prompt.format(n=gen.n_subconcepts, concept=node.concept, domain=domain, path=" > ".join(node.path))
    if json_mode:
        prompt += gen.json_hint
    return [{"role": "user", "content": prompt}]


def build_tree(domain: str, gen: GenerateConfig, model: ChatClient, params: GenerationParams, json_mode: bool = False) -> Tree:
    """Expand the tree level by level (one batched call per level and retry round) down to `gen.depth`.

    `json_mode` asks the backend for structured output and appends `gen.json_hint` to the prompt; replies
    in any list format are parsed either way.
    """
    tree = Tree(domain, {})
    root = Node(domain, [domain], None, status=EXPANDED if gen.scopes else LEAF)
    tree.nodes[root.id] = root
    frontier = [_add_child(tree, root, scope) for scope in gen.scopes]
    counts = dict.fromkeys(("expansion_calls", "expansion_retries", "expansion_failed", "atomic_nodes", "truncated_lists", "dropped_cut_names",
                            "dropped_sibling_duplicates", "dropped_ancestor_duplicates", "dropped_over_n"), 0)
    params = dataclasses.replace(params, json_mode=json_mode)
    for level in range(gen.depth):
        if not frontier:
            break
        conversations = [subconcept_conversation(gen, domain, node, json_mode) for node in frontier]
        asked = ask(model, conversations, params, parse_list, max_retries=gen.max_retries, cut=drop_cut_name, reject_foreign_script=True)
        counts["expansion_calls"] += sum(a.attempts for a in asked)
        counts["expansion_retries"] += sum(a.attempts - 1 for a in asked)
        next_frontier: list[Node] = []
        for node, result in zip(frontier, asked):
            if result.value is None:
                node.status = FAILED
                counts["expansion_failed"] += 1
                continue
            items = list(result.value)  # a cut-off reply has lost the name the cut fell in (ask's `cut`)
            if result.completion.finish_reason == "length":
                counts["truncated_lists"] += 1
                counts["dropped_cut_names"] += result.cut_items
            seen = {concept_key(c) for c in node.path}
            siblings: set[str] = set()
            for item in items:
                key = concept_key(item)
                if key in seen:
                    counts["dropped_ancestor_duplicates"] += 1
                elif key in siblings:
                    counts["dropped_sibling_duplicates"] += 1
                elif len(node.children) >= gen.n_subconcepts:
                    counts["dropped_over_n"] += 1
                else:
                    siblings.add(key)
                    next_frontier.append(_add_child(tree, node, item))
            node.status = EXPANDED if node.children else ATOMIC
            counts["atomic_nodes"] += not node.children
        log.info("concept tree level %d: %d nodes -> %d sub-concepts", level + 2, len(frontier), len(next_frontier))
        frontier = next_frontier
    leaves = tree.leaves()
    counts.update(nodes=len(tree.nodes), leaves=len(leaves), max_depth=max(n.depth for n in tree.nodes.values()))
    tree.counts = counts
    return tree


def draw_tree(tree: Tree, path: str | Path, max_rows: int = 80) -> Path:
    """Draw the tree left to right; deep levels are collapsed (with their leaf counts) to keep it readable.

    Scope nodes are labelled with their leaf counts. The deepest level shown is the deepest one with at
    most `max_rows` nodes, so the picture stays legible for trees with thousands of leaves.
    """
    plt = pyplot()

    per_depth: dict[int, int] = {}
    for node in tree.nodes.values():
        per_depth[node.depth] = per_depth.get(node.depth, 0) + 1
    shown_depth = max([d for d, k in per_depth.items() if k <= max_rows] or [1])
    rows: list[Node] = []
    positions: dict[str, tuple[float, float]] = {}

    def place(node: Node) -> float:
        visible = [tree.nodes[c] for c in node.children] if node.depth < shown_depth else []
        if not visible:
            y = float(len(rows))
            rows.append(node)
        else:
            ys = [place(c) for c in visible]
            y = sum(ys) / len(ys)
        positions[node.id] = (float(node.depth), y)
        return y

    place(tree.root)
    height = max(3.0, 0.28 * len(rows) + 1)
    fig, ax = plt.subplots(figsize=(3.2 * (shown_depth + 1), height))
    for nid, (x, y) in positions.items():
        node = tree.nodes[nid]
        parent = positions.get(node.parent) if node.parent else None
        if parent:
            ax.plot([parent[0], x], [parent[1], y], color="0.7", linewidth=0.8, zorder=1)
        n_leaves = len(tree.leaves(node)) if node.children else 0
        label = node.concept if len(node.concept) <= 40 else node.concept[:37] + "..."
        if node.depth == 1 or (node.children and node.depth == shown_depth):
            label += f"  ({n_leaves} leaves)" if node.children else "  (leaf)"
        color = {FAILED: "tab:red", ATOMIC: "tab:orange"}.get(node.status, "tab:blue" if node.children else "tab:green")
        ax.scatter([x], [y], s=18, color=color, zorder=2)
        ax.annotate(label, (x, y), xytext=(5, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_xlim(-0.2, shown_depth + 0.9)
    ax.invert_yaxis()
    ax.axis("off")
    total = tree.counts.get("leaves", len(tree.leaves()))
    ax.set_title(f"Concept tree: {tree.domain} — {len(tree.nodes)} nodes, {total} leaves"
                 + ("" if shown_depth >= max(per_depth) else f" (levels {shown_depth + 2}+ collapsed into leaf counts)"), fontsize=9)
    return save_figure(fig, path)
