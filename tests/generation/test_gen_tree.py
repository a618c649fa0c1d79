"""Concept-tree expansion: shape, dedup among siblings and against ancestors, bounded retries, stable ids."""

from __future__ import annotations

import re

from conftest import client_of
from gen_scripted import Scripted, make_cfg

from unifit.concept_tree import ATOMIC, EXPANDED, FAILED, Tree, node_id
from unifit.generation.tree import build_tree, draw_tree
from unifit.llm.base import Completion, GenerationParams


def expansion_prompts(model: Scripted) -> list[str]:
    return [p for p in model.calls if "sub-concepts for" in p]


def test_shape_for_n_and_depth_and_one_batch_per_level(tmp_path) -> None:
    gen = make_cfg(tmp_path, n_subconcepts=3, depth=2, scopes=["Email", "DNS"]).generate
    model = Scripted()
    tree = build_tree("cybersecurity", gen, model, GenerationParams())
    assert tree.counts["nodes"] == 1 + 2 + 6 + 18 and tree.counts["leaves"] == 18
    assert {leaf.depth for leaf in tree.leaves()} == {3}
    assert all(len(leaf.path) == 4 and leaf.path[:1] == ["cybersecurity"] for leaf in tree.leaves())
    assert model.batches == [2, 6]  # one batched call per level
    assert tree.leaf_counts_per_scope() == {"Email": 9, "DNS": 9}


def test_depth_zero_makes_scopes_the_leaves(tmp_path) -> None:
    gen = make_cfg(tmp_path, depth=0, scopes=["Email", "DNS", "PKI"]).generate
    model = Scripted()
    tree = build_tree("cybersecurity", gen, model, GenerationParams())
    assert [leaf.concept for leaf in tree.leaves()] == ["Email", "DNS", "PKI"] and model.calls == []


def test_sibling_and_ancestor_duplicates_dropped_case_insensitively(tmp_path) -> None:
    gen = make_cfg(tmp_path, n_subconcepts=3, depth=1, scopes=["Email"]).generate
    reply = "1. Spoofing\n2. **spoofing**.\n3. EMAIL\n4. Cybersecurity\n5. Open Relay\n6. Greylisting\n7. Bounce handling"
    model = Scripted(override=lambda prompt, seed: Completion(reply, "stop"))
    tree = build_tree("cybersecurity", gen, model, GenerationParams())
    scope = tree.nodes[node_id(["cybersecurity", "Email"])]
    assert [tree.nodes[c].concept for c in scope.children] == ["Spoofing", "Open Relay", "Greylisting"]
    assert tree.counts["dropped_sibling_duplicates"] == 1
    assert tree.counts["dropped_ancestor_duplicates"] == 2  # "EMAIL" (parent) and "Cybersecurity" (root)
    assert tree.counts["dropped_over_n"] == 1


def test_unparsable_expansion_retried_boundedly_then_leaf_and_counted(tmp_path) -> None:
    gen = make_cfg(tmp_path, n_subconcepts=2, depth=2, scopes=["Email", "DNS"], max_retries=2).generate

    def override(prompt: str, seed: int):
        if "for DNS in" in prompt:
            return Completion("DNS is a large and complicated topic with many different aspects to it.", "stop")
        if "for Email in" in prompt and seed == 0:  # the first try fails, the retry (new seed) parses
            return Completion('{"concepts": ["SPF", "DKIM', "length")
        return None

    model = Scripted(override=override)
    tree = build_tree("cybersecurity", gen, model, GenerationParams(seed=0))
    dns = tree.nodes[node_id(["cybersecurity", "DNS"])]
    assert dns.status == FAILED and not dns.children
    assert sum("for DNS in" in p for p in model.calls) == gen.max_retries + 1
    assert sum("for Email in" in p for p in model.calls) == 2
    assert tree.counts["expansion_failed"] == 1 and tree.counts["expansion_retries"] == 3
    assert tree.leaf_counts_per_scope() == {"Email": 4, "DNS": 1}  # the failed scope is a leaf of its own


def test_truncated_list_drops_a_cut_name_keeps_a_whole_one_and_empty_list_is_atomic(tmp_path) -> None:
    gen = make_cfg(tmp_path, n_subconcepts=3, depth=1, scopes=["Email", "DNS", "PKI"]).generate

    def override(prompt: str, seed: int):
        if "for Email in" in prompt:
            return Completion("1. SPF\n2. DKIM\n3. DMA", "length")
        if "for DNS in" in prompt:
            return Completion("1) Cache poisoning: forged answers in a resolver\n2) Zone walking: enumerating a signed zo", "length")
        return Completion('{"concepts": []}', "stop")

    tree = build_tree("cybersecurity", gen, Scripted(override=override), GenerationParams())
    email, dns, pki = (tree.nodes[node_id(["cybersecurity", s])] for s in ("Email", "DNS", "PKI"))
    assert [tree.nodes[c].concept for c in email.children] == ["SPF", "DKIM"] and email.status == EXPANDED
    assert [tree.nodes[c].concept for c in dns.children] == ["Cache poisoning", "Zone walking"]
    assert tree.counts["truncated_lists"] == 2 and tree.counts["dropped_cut_names"] == 1
    assert pki.status == ATOMIC and tree.counts["atomic_nodes"] == 1


def test_json_mode_requests_json_and_appends_hint(tmp_path) -> None:
    gen = make_cfg(tmp_path, depth=1, scopes=["Email"]).generate
    seen = []

    def generate(conversations, params):
        seen.append(params.json_mode)
        assert conversations[0][0]["content"].endswith(gen.json_hint)
        return [Completion('{"concepts": ["SPF", "DKIM"]}', "stop")]

    tree = build_tree("cybersecurity", gen, client_of(generate), GenerationParams(), json_mode=True)
    assert seen == [True] and [n.concept for n in tree.leaves()] == ["SPF", "DKIM"]


def test_ids_stable_and_json_roundtrip_and_drawing(tmp_path) -> None:
    gen = make_cfg(tmp_path, n_subconcepts=2, depth=2).generate
    first = build_tree("cybersecurity", gen, Scripted(), GenerationParams())
    second = build_tree("cybersecurity", gen, Scripted(), GenerationParams())
    assert list(first.nodes) == list(second.nodes)
    assert all(re.fullmatch(r"[0-9a-f]{16}", nid) and nid == node_id(n.path) for nid, n in first.nodes.items())
    restored = Tree.from_json(first.to_json())
    assert [n.id for n in restored.leaves()] == [n.id for n in first.leaves()] and restored.counts == first.counts
    png = draw_tree(first, tmp_path / "tree.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
