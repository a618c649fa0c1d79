"""Leaf questions and follow-up turns: the concept tree's instances, with every rejected item counted.

A chunk of leaves is one batched leaf call (plus retry rounds) and one batched call per follow-up
turn, so the Ray actor pool always sees large batches. Filters are applied per question/answer pair:
unparsable (after retries; also a reply in another script than the prompt, or cut off before one whole
item), truncated (finish_reason "length"), refusal, wrong language, empty, too short, too long.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Optional, Sequence, TypeVar

from unifit.concept_tree import Node
from unifit.config import GenerateConfig
from unifit.generation.parsing import clean_item, drop_last, parse_list, parse_qa
from unifit.llm.asking import ask
from unifit.llm.base import ChatClient, Conversation, GenerationParams
from unifit.records import Instance
from unifit.text import foreign_script, is_refusal

T = TypeVar("T")

# Counter names that the stage reports as headline metrics: shared as constants, so a misspelt name fails at import
# instead of silently reporting 0.
EMPTY, REFUSAL, WRONG_LANGUAGE, TOO_SHORT, TOO_LONG = "empty", "refusal", "wrong_language", "too_short", "too_long"
UNPARSABLE_LEAF_REPLIES = "unparsable_leaf_replies"
TRUNCATED = "truncated"
FOLLOWUP = "followup_"  # prefix of the follow-up turns' counters
FOLLOWUP_UNPARSABLE = FOLLOWUP + "unparsable"
FOLLOWUP_TRUNCATED = FOLLOWUP + TRUNCATED
HEADLINE_COUNTS = (UNPARSABLE_LEAF_REPLIES, TRUNCATED, REFUSAL, WRONG_LANGUAGE, TOO_SHORT, TOO_LONG, EMPTY,
                   FOLLOWUP_UNPARSABLE, FOLLOWUP_TRUNCATED)


def leaf_conversation(gen: GenerateConfig, leaf: Node) -> Conversation:
    prompt = gen.leaf_prompt.format(q=gen.questions_per_leaf, leaf=leaf.concept, path=" > ".join(leaf.path), domain=leaf.path[0])
    return [{"role": "user", "content": prompt}]


def followup_conversation(gen: GenerateConfig, question: str) -> Conversation:
    return [{"role": "user", "content": gen.followup_prompt.format(question=question)}]


def reject_reason(question: str, answer: str, gen: GenerateConfig) -> Optional[str]:
    """Why a question/answer pair is unusable (a report key), or None if it is kept."""
    if not question.strip() or not answer.strip():
        return EMPTY
    if is_refusal(answer) or is_refusal(question):
        return REFUSAL
    if foreign_script(answer, question):
        return WRONG_LANGUAGE
    if len(answer.strip()) < gen.min_answer_chars:
        return TOO_SHORT
    if len(answer.strip()) > gen.max_answer_chars:
        return TOO_LONG
    return None


def parse_followup_question(text: str) -> Optional[str]:
    """A follow-up question reply: its first line that reads as a question ("Question:" labels and list markers removed;
    a question mark and three words at least); None if none does.

    Its own format, apart from `evaluation.questions.parse_test_question`: a follow-up must be a question about the
    last answer, where a test question may be an instruction, so the two parsers accept different replies."""
    for line in text.splitlines():
        item = re.sub(r"^(?:new\s+)?(?:question|q)\s*\d*\s*[:.-]\s*", "", clean_item(line), flags=re.IGNORECASE)
        if item.endswith("?") and len(item.split()) >= 3:
            return item
    return None


def with_answer_system_prompt(gen: GenerateConfig, conversation: Conversation) -> Conversation:
    """The conversation as sent for an answer: `answer_system_prompt` first when set (never stored in the instance)."""
    return ([{"role": "system", "content": gen.answer_system_prompt}] if gen.answer_system_prompt else []) + list(conversation)


def _answer(conversations: list[Conversation], gen: GenerateConfig, model: ChatClient, params: GenerationParams,
            counts: Counter[str], prefix: str) -> list[Optional[str]]:
    """Answers from the model asked directly (two-step mode); a cut-off answer is counted and dropped."""
    if not conversations:
        return []
    completions = model.complete([with_answer_system_prompt(gen, c) for c in conversations], params)
    counts[f"{prefix}answer_calls"] += len(completions)
    answers: list[Optional[str]] = []
    for completion in completions:
        if completion.finish_reason == "length":
            counts[prefix + TRUNCATED] += 1
            answers.append(None)
        else:
            answers.append(completion.text.strip())
    return answers


def _leaf_items(leaves: Sequence[Node], prompts: list[Conversation], parse: Callable[[str], Optional[list[T]]],
                gen: GenerateConfig, model: ChatClient, params: GenerationParams, counts: Counter[str],
                truncated_key: str) -> list[tuple[Node, T]]:
    """One reply per leaf, parsed into items; a cut-off reply loses its last item (where the cut happened), at most q kept."""
    asked = ask(model, prompts, params, parse, max_retries=gen.max_retries, cut=drop_last, reject_foreign_script=True)
    counts["leaf_calls"] += sum(a.attempts for a in asked)
    counts["leaf_retries"] += sum(a.attempts - 1 for a in asked)
    kept: list[tuple[Node, T]] = []
    for leaf, result in zip(leaves, asked):
        if result.value is None:
            counts[UNPARSABLE_LEAF_REPLIES] += 1
            continue
        items = list(result.value)  # without the item the cut fell in
        if result.completion.finish_reason == "length":
            counts[truncated_key] += 1
        if len(items) > gen.questions_per_leaf:
            counts["dropped_over_q"] += len(items) - gen.questions_per_leaf
            items = items[: gen.questions_per_leaf]
        kept.extend((leaf, item) for item in items)
    return kept


def _joint_pairs(leaves: Sequence[Node], gen: GenerateConfig, model: ChatClient, params: GenerationParams,
                 counts: Counter[str]) -> list[tuple[Node, str, str]]:
    """The paper's prompt: q questions with answers in one reply per leaf."""
    prompts = [leaf_conversation(gen, leaf) for leaf in leaves]
    items = _leaf_items(leaves, prompts, parse_qa, gen, model, params, counts, TRUNCATED)
    return [(leaf, question, answer) for leaf, (question, answer) in items]


def _two_step_pairs(leaves: Sequence[Node], gen: GenerateConfig, model: ChatClient, params: GenerationParams,
                    counts: Counter[str]) -> list[tuple[Node, str, str]]:
    """Small generators: q questions as a list per leaf, then each question asked directly for its answer."""
    prompts = [[{"role": "user", "content": gen.leaf_questions_prompt.format(
        q=gen.questions_per_leaf, leaf=leaf.concept, path=" > ".join(leaf.path), domain=leaf.path[0])}] for leaf in leaves]
    questions = _leaf_items(leaves, prompts, lambda text: parse_list(text, clean=clean_item), gen, model, params, counts,
                            "truncated_question_lists")
    answers = _answer([[{"role": "user", "content": q}] for _, q in questions], gen, model, params, counts, "")
    return [(leaf, q, a) for (leaf, q), a in zip(questions, answers) if a is not None]


def _followups(conversations: list[tuple[Node, Conversation]], gen: GenerateConfig, model: ChatClient,
               params: GenerationParams, counts: Counter[str]) -> None:
    """Extend conversations by `gen.turns - 1` follow-up turns in place; a failed follow-up ends that conversation."""
    active = list(range(len(conversations)))
    for _turn in range(2, gen.turns + 1):
        if not active:
            break
        last_questions = [conversations[i][1][-2]["content"] for i in active]
        if gen.leaf_mode == "two_step":
            prompts = [[{"role": "user", "content": gen.followup_question_prompt.format(question=q)}] for q in last_questions]
            asked = ask(model, prompts, params, parse_followup_question, max_retries=gen.max_retries, reject_foreign_script=True)
        else:
            asked = ask(model, [followup_conversation(gen, q) for q in last_questions], params, parse_qa,
                        max_retries=gen.max_retries, cut=drop_last, reject_foreign_script=True)
        counts["followup_calls"] += sum(a.attempts for a in asked)
        counts["followup_retries"] += sum(a.attempts - 1 for a in asked)
        candidates: list[tuple[int, str, Optional[str]]] = []
        for index, result in zip(active, asked):
            if result.value is None:
                counts[FOLLOWUP_UNPARSABLE] += 1
            elif gen.leaf_mode == "two_step":
                candidates.append((index, result.value, None))
            else:
                question, answer = result.value[0]
                candidates.append((index, question, answer))
        if gen.leaf_mode == "two_step":  # answer each follow-up with the whole conversation so far as context
            contexts = [conversations[i][1] + [{"role": "user", "content": q}] for i, q, _ in candidates]
            answers = _answer(contexts, gen, model, params, counts, FOLLOWUP)
            candidates = [(i, q, a) for (i, q, _), a in zip(candidates, answers) if a is not None]
        still: list[int] = []
        for index, question, answer in candidates:
            reason = reject_reason(question, answer or "", gen)
            if reason:
                counts[FOLLOWUP + reason] += 1
                continue
            conversations[index][1].extend([{"role": "user", "content": question}, {"role": "assistant", "content": answer or ""}])
            counts["followups_kept"] += 1
            still.append(index)
        active = still


def generate_leaf_instances(
    leaves: Sequence[Node], gen: GenerateConfig, model: ChatClient, params: GenerationParams, generator: str
) -> tuple[list[Instance], Counter[str]]:
    """Instances for a chunk of leaves: q single-turn pairs per leaf, then `gen.turns - 1` follow-up turns each.

    `leaf_mode=joint` is the paper's one-reply Q&A prompt; `two_step` lists questions, then asks each one,
    which small generators follow far more reliably. A truncated reply keeps its complete items and drops
    the last (where the cut happened). Every rejected pair and failed follow-up is counted.
    """
    counts: Counter[str] = Counter()
    pair_source = _two_step_pairs if gen.leaf_mode == "two_step" else _joint_pairs
    conversations: list[tuple[Node, Conversation]] = []
    for leaf, question, answer in pair_source(leaves, gen, model, params, counts):
        reason = reject_reason(question, answer, gen)
        if reason:
            counts[reason] += 1
        else:
            conversations.append((leaf, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]))
    counts["pairs_kept"] += len(conversations)
    _followups(conversations, gen, model, params, counts)
    instances = [Instance(messages=messages, leaf_id=leaf.id, concept_path=list(leaf.path), source="concept_tree", generator=generator)
                 for leaf, messages in conversations]
    counts["instances"] += len(instances)
    counts["short_conversations"] += sum(1 for inst in instances if len(inst.messages) < 2 * gen.turns)
    return instances, counts
