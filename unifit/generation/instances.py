"""Leaf questions and follow-up turns: the concept tree's instances, with every rejected item counted.

A chunk of leaves is one batched leaf call (plus retry rounds) and one batched call per follow-up
turn, so the Ray actor pool always sees large batches. Filters are applied per question/answer pair:
unparsable (after retries), truncated (finish_reason "length"), refusal, empty, too short, too long.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from unifit.config import GenerateConfig
from unifit.generation.parsing import GenerateFn, ask_parsed, is_refusal, parse_qa
from unifit.generation.tree import Node
from unifit.llm.base import Conversation, GenerationParams
from unifit.records import Instance


def leaf_conversation(gen: GenerateConfig, leaf: Node) -> Conversation:
    prompt = gen.leaf_prompt.format(q=gen.questions_per_leaf, leaf=leaf.concept, path=" > ".join(leaf.path), domain=leaf.path[0])
    return [{"role": "user", "content": prompt}]


def followup_conversation(gen: GenerateConfig, question: str) -> Conversation:
    return [{"role": "user", "content": gen.followup_prompt.format(question=question)}]


def reject_reason(question: str, answer: str, gen: GenerateConfig) -> Optional[str]:
    """Why a question/answer pair is unusable (a report key), or None if it is kept."""
    if not question.strip() or not answer.strip():
        return "empty"
    if is_refusal(answer) or is_refusal(question):
        return "refusal"
    if len(answer.strip()) < gen.min_answer_chars:
        return "too_short"
    if len(answer.strip()) > gen.max_answer_chars:
        return "too_long"
    return None


def generate_leaf_instances(
    leaves: Sequence[Node], gen: GenerateConfig, generate_fn: GenerateFn, params: GenerationParams, generator: str
) -> tuple[list[Instance], Counter[str]]:
    """Instances for a chunk of leaves: q single-turn pairs per leaf, then `gen.turns - 1` follow-up turns each.

    A truncated reply keeps its complete pairs and drops the last one (it is where the cut happened). A
    follow-up that fails ends that conversation early (the turns it has are kept; counted under followup_*).
    """
    counts: Counter[str] = Counter()
    asked = ask_parsed(generate_fn, [leaf_conversation(gen, leaf) for leaf in leaves], params, parse_qa, gen.max_retries)
    counts["leaf_calls"] += sum(a.attempts for a in asked)
    counts["leaf_retries"] += sum(a.attempts - 1 for a in asked)
    conversations: list[tuple[Node, Conversation]] = []
    for leaf, result in zip(leaves, asked):
        if result.value is None:
            counts["unparsable_leaf_replies"] += 1
            continue
        pairs = list(result.value)
        if result.completion.finish_reason == "length":
            pairs = pairs[:-1]
            counts["truncated"] += 1
        if len(pairs) > gen.questions_per_leaf:
            counts["dropped_over_q"] += len(pairs) - gen.questions_per_leaf
            pairs = pairs[: gen.questions_per_leaf]
        for question, answer in pairs:
            reason = reject_reason(question, answer, gen)
            if reason:
                counts[reason] += 1
            else:
                conversations.append((leaf, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]))
    counts["pairs_kept"] += len(conversations)

    active = list(range(len(conversations)))
    for _turn in range(2, gen.turns + 1):
        if not active:
            break
        prompts = [followup_conversation(gen, conversations[i][1][-2]["content"]) for i in active]
        asked = ask_parsed(generate_fn, prompts, params, parse_qa, gen.max_retries)
        counts["followup_calls"] += sum(a.attempts for a in asked)
        counts["followup_retries"] += sum(a.attempts - 1 for a in asked)
        still: list[int] = []
        for index, result in zip(active, asked):
            if result.value is None:
                counts["followup_unparsable"] += 1
                continue
            if result.completion.finish_reason == "length":
                counts["followup_truncated"] += 1
                continue
            question, answer = result.value[0]
            reason = reject_reason(question, answer, gen)
            if reason:
                counts[f"followup_{reason}"] += 1
                continue
            conversations[index][1].extend([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
            counts["followups_kept"] += 1
            still.append(index)
        active = still

    instances = [Instance(messages=messages, leaf_id=leaf.id, concept_path=list(leaf.path), source="concept_tree", generator=generator)
                 for leaf, messages in conversations]
    counts["instances"] += len(instances)
    counts["short_conversations"] += sum(1 for inst in instances if len(inst.messages) < 2 * gen.turns)
    return instances, counts
