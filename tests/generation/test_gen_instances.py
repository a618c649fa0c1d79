"""Leaf instances: multi-turn structure, every filter counted, truncation handled, bounded retries."""

from __future__ import annotations

import pytest
from conftest import client_of
from gen_scripted import Scripted, make_cfg, pseudo_word

from unifit.generation.instances import generate_leaf_instances, parse_followup_question
from unifit.generation.tree import build_tree
from unifit.llm.base import Completion, GenerationParams
from unifit.records import instance_id


def leaves_of(tmp_path, **generate):
    cfg = make_cfg(tmp_path, **generate)
    tree = build_tree(cfg.domain, cfg.generate, Scripted(), GenerationParams())
    return cfg.generate, tree.leaves()


@pytest.mark.parametrize("reply,expected", [
    ("Sure! Here is a question:\nWhat is DNS spoofing?", "What is DNS spoofing?"),  # the chatter line is skipped
    ("Question 2: How does DKIM sign mail?", "How does DKIM sign mail?"),  # the label is removed
    ("Explain how SPF records work", None),  # a follow-up must be a question: an instruction is not one
    ("What is DNS? It maps names.", None),  # the line must end at its question mark
    ("Why?", None),  # fewer than three words
])
def test_parse_followup_question(reply: str, expected: str | None) -> None:
    assert parse_followup_question(reply) == expected


def test_multi_turn_structure_and_instance_fields(tmp_path) -> None:
    gen, leaves = leaves_of(tmp_path, turns=3, questions_per_leaf=2)
    model = Scripted()
    instances, counts = generate_leaf_instances(leaves, gen, model, GenerationParams(), "smollm2_135m")
    assert len(instances) == 2 * len(leaves) == counts["instances"]
    assert model.batches == [len(leaves), len(instances), len(instances)]  # leaves, then one batch per follow-up turn
    for inst in instances:
        assert [m["role"] for m in inst.messages] == ["user", "assistant"] * 3
        assert inst.messages[2]["content"].startswith("What happens next with")
        leaf = next(leaf for leaf in leaves if leaf.id == inst.leaf_id)
        assert inst.concept_path == leaf.path and inst.concept_path[0] == "cybersecurity"
        assert inst.source == "concept_tree" and inst.generator == "smollm2_135m" and inst.id == instance_id(inst.messages)
    followup_questions = [p for p in model.calls if p.startswith("Based on the question")]
    assert any(instances[0].messages[0]["content"] in p for p in followup_questions)


def test_filters_count_refusal_short_long_truncated_and_unparsable(tmp_path) -> None:
    gen, leaves = leaves_of(tmp_path, scopes=["Email", "DNS", "PKI", "CDN", "BGP"], depth=0, max_retries=1,
                            min_answer_chars=20, max_answer_chars=200)
    good = "It verifies the sender domain against the published record."
    replies = {
        "Email": Completion(f"Question 1: What is SPF?\nAnswer 1: I'm sorry, but as an AI I cannot answer that.\n"
                           f"Question 2: Why SPF?\nAnswer 2: {good}", "stop"),
        "DNS": Completion("Question 1: What is DNS?\nAnswer 1: Names.\nQuestion 2: Why DNSSEC?\nAnswer 2: " + "x" * 300, "stop"),
        "PKI": Completion(f"Question 1: What is a CA?\nAnswer 1: {good}\nQuestion 2: What is OCSP?\nAnswer 2: It che", "length"),
        "CDN": Completion("A CDN is a network of servers, and that is all there is to say.", "stop"),
    }
    model = Scripted(override=lambda prompt, seed: next((r for k, r in replies.items() if f"questions for {k} (" in prompt), None))
    instances, counts = generate_leaf_instances(leaves, gen, model, GenerationParams(), "m")
    kept = {inst.messages[0]["content"] for inst in instances}
    assert {"Why SPF?", "What is a CA?"} <= kept and len(kept) == 4  # + BGP's two regular pairs
    assert counts["refusal"] == 1 and counts["too_short"] == 1 and counts["too_long"] == 1
    assert counts["truncated"] == 1 and counts["unparsable_leaf_replies"] == 1
    assert sum("questions for CDN (" in p for p in model.calls) == gen.max_retries + 1
    assert counts["leaf_retries"] == 1


def test_failed_followup_ends_conversation_early_and_is_counted(tmp_path) -> None:
    gen, leaves = leaves_of(tmp_path, scopes=["Email"], depth=0, turns=2, questions_per_leaf=2, max_retries=0)

    first_question_word = pseudo_word("Email", "1-0").lower()  # a word only the first leaf question contains
    model = Scripted(override=lambda prompt, seed: Completion("Question: Next?\nAnswer: no", "stop")
                     if prompt.startswith("Based on the question") and first_question_word in prompt else None)
    instances, counts = generate_leaf_instances(leaves, gen, model, GenerationParams(), "m")
    assert sorted(len(i.messages) for i in instances) == [2, 4]
    assert counts["followup_too_short"] == 1 and counts["short_conversations"] == 1 and counts["followups_kept"] == 1


def two_step_replies(prompt: str, seed: int) -> Completion | None:
    """SmolLM2-like behaviour: lists questions fine, answers direct questions, ignores follow-up instructions half the time."""
    import re

    if m := re.match(r"Please generate (\d+) questions about (.+?) \(", prompt):
        leaf = m.group(2)
        items = [f"{i}. How does {leaf} use {pseudo_word(leaf, str(i)).lower()} in practice?" for i in range(1, int(m.group(1)) + 2)]
        return Completion("\n".join(items), "stop", 30)  # one question more than asked for
    if m := re.match(r'Based on the question "(.+?)", generate a new question', prompt):
        if "1" in pseudo_word(m.group(1)) or len(m.group(1)) % 2:
            return Completion("I'm ready when you are! What can I help you with today", "stop", 12)
        return Completion(f"Question: What comes after {pseudo_word(m.group(1)).lower()} is configured?", "stop", 12)
    if prompt.endswith("?"):
        if "2" in prompt.split("use")[0]:
            return Completion("An answer that ran out of tokens", "length", 200)
        return Completion(f"It works by checking {pseudo_word(prompt).lower()} at every step and logging it.", "stop", 20)
    return None


def test_two_step_mode_lists_questions_then_answers_each(tmp_path) -> None:
    gen, leaves = leaves_of(tmp_path, turns=2, questions_per_leaf=2, leaf_mode="two_step", max_retries=1)
    model = Scripted(override=two_step_replies)
    followup_context_lengths: list[int] = []

    def recording(conversations, params):
        followup_context_lengths.extend(len(c) for c in conversations if c[-1]["content"].startswith("What comes after"))
        return model.complete(conversations, params)

    instances, counts = generate_leaf_instances(leaves, gen, client_of(recording), GenerationParams(), "smollm2_135m")
    assert counts["dropped_over_q"] == len(leaves)  # the third listed question is cut to q=2
    asked_directly = [p for p in model.calls if p.endswith("?") and not p.startswith(("Please", "Based"))]
    assert len(asked_directly) >= 2 * len(leaves)
    assert counts["pairs_kept"] + counts["truncated"] == 2 * len(leaves)
    kept_followups = counts["followups_kept"]
    assert kept_followups + counts["followup_unparsable"] + counts["followup_truncated"] == counts["pairs_kept"]
    assert len(instances) == counts["pairs_kept"]
    two_turn = [inst for inst in instances if len(inst.messages) == 4]
    assert len(two_turn) == kept_followups > 0
    for inst in two_turn:
        assert inst.messages[2]["content"].startswith("What comes after") and inst.messages[2]["content"].endswith("?")
        assert inst.messages[3]["content"].startswith("It works by checking")
    assert followup_context_lengths and set(followup_context_lengths) == {3}  # asked with the first turn as context
