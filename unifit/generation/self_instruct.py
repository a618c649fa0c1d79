"""Self-Instruct baseline (Wang et al. 2023): bootstrap instructions from seed tasks, then answer them.

Same domain, same generator model and the same target size as the concept tree, so the diversity and
win-rate comparisons measure the method, not the budget. Each round: sample in-context tasks (seed
tasks plus up to 2 machine-generated ones), ask for new tasks, keep those that pass Wang et al.'s
heuristic filters and are novel (ROUGE-L F1 <= threshold against every kept task), answer them.
Novelty is checked only against MinHash-LSH candidates whose estimated word Jaccard similarity could allow a
ROUGE-L F1 above the threshold, so no Python work grows with the whole pool.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import sys
from collections import Counter
from typing import Callable, Optional

from tqdm import tqdm

from unifit.config import GenerateConfig
from unifit.dedup import NearDuplicateIndex
from unifit.generation.instances import reject_reason, with_answer_system_prompt
from unifit.generation.parsing import clean_item, drop_last, parse_list
from unifit.concept_tree import node_id
from unifit.llm.asking import ask
from unifit.llm.base import ChatClient, GenerationParams
from unifit.records import Instance

log = logging.getLogger(__name__)

# Wang et al. drop tasks a text-only model cannot do (images, files, ...); same list as their code.
UNSUITABLE_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
STALL_ROUNDS = 3  # rounds in a row without one new instruction before giving up
ANSWER_CHUNK = 8192  # tasks answered per call: enough to fill every engine, and a round holds only one chunk's answers
# Which kept tasks get a ROUGE-L check. For texts without repeated words, ROUGE-L F1 > 0.7 needs more than
# 0.35 * (len a + len b) shared words, i.e. a word-set Jaccard similarity above 0.35 / 0.65 = 0.54. LSH at 0.4
# (32 bands of 4 MinHash values) proposes ~94% of pairs at 0.54; of those, only pairs whose 128-value estimate
# reaches 0.45 (two standard errors below 0.54) are scored.
CANDIDATE_JACCARD = 0.4
ESTIMATED_JACCARD_FLOOR = 0.45


def seed_tasks(domain: str, scopes: list[str], templates: list[str]) -> list[str]:
    """The seed pool: every template instantiated for every scope (deterministic order)."""
    return [t.format(scope=scope, domain=domain) for scope in scopes for t in templates]


def unsuitable(instruction: str) -> Optional[str]:
    """Wang et al.'s heuristic filters: a report key for a rejected instruction, else None."""
    words = instruction.split()
    if len(words) < 3:
        return "too_short"
    if len(words) > 150:
        return "too_long"
    if not instruction[0].isalnum():
        return "bad_start"
    lowered = instruction.casefold()
    if any(re.search(rf"\b{re.escape(w)}\b", lowered) for w in UNSUITABLE_WORDS):
        return "unsuitable_keyword"
    return None


class NoveltyFilter:
    """ROUGE-L novelty against every kept instruction, checked only on likely candidates.

    MinHash LSH and the signatures' estimated Jaccard similarity pick the candidates (vectorised, so the pool's
    size costs numpy time, not Python time). Each kept instruction's tokens are kept (tokenised once), and a
    candidate is compared by LCS only when the tokens both share could reach the threshold: the LCS is at most the
    size of the two token multisets' intersection, so ROUGE-L F1 = 2·LCS / (len a + len b) is at most
    2·shared / (len a + len b). `lcs_checks` counts the LCS tables computed.
    """

    def __init__(self, rouge_threshold: float) -> None:
        from rouge_score.tokenizers import DefaultTokenizer

        self.threshold = rouge_threshold
        self._tokenizer = DefaultTokenizer(use_stemmer=False)  # what RougeScorer(["rougeL"], use_stemmer=False) uses
        self._index = NearDuplicateIndex(CANDIDATE_JACCARD, shingle_size=1)
        self._tokens: dict[str, tuple[str, ...]] = {}  # counted only for the few candidates that pass the estimate
        self.lcs_checks = 0

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def lsh_candidates(self) -> int:
        """Kept instructions LSH proposed, summed over the checks (most are dropped by the estimate, before any LCS)."""
        return self._index.proposed

    def is_novel(self, text: str) -> bool:
        """No likely candidate among the kept instructions has a ROUGE-L F1 above the threshold with `text`."""
        return self._is_novel(self._tokenizer.tokenize(text), self._index.signature(text))

    def remember(self, text: str) -> None:
        """Add `text` to the pool unconditionally (seed tasks, which may resemble each other)."""
        self._remember(self._tokenizer.tokenize(text), self._index.signature(text))

    def add(self, text: str) -> bool:
        """Keep `text` if it is novel; True when kept."""
        tokens, signature = self._tokenizer.tokenize(text), self._index.signature(text)  # each computed once
        if not self._is_novel(tokens, signature):
            return False
        self._remember(tokens, signature)
        return True

    def _is_novel(self, tokens: list[str], signature) -> bool:
        from rouge_score.rouge_scorer import _score_lcs

        counts = Counter(tokens)
        for key in self._index.similar(signature, ESTIMATED_JACCARD_FLOOR):
            kept = self._tokens[key]
            if not tokens or not kept:
                continue  # ROUGE-L of an empty token list is 0
            kept_counts = Counter(kept)
            shared = sum(min(count, kept_counts[token]) for token, count in counts.items() if token in kept_counts)
            if 2 * shared / (len(tokens) + len(kept)) <= self.threshold - 1e-9:
                continue  # cannot exceed the threshold (the margin covers F1's other rounding)
            self.lcs_checks += 1
            if _score_lcs(kept, tokens).fmeasure > self.threshold:
                return False
        return True

    def _remember(self, tokens: list[str], signature) -> None:
        key = str(len(self._tokens))
        self._index.insert(key, signature)
        self._tokens[key] = tuple(sys.intern(token) for token in tokens)  # one copy per distinct word


def _prompt(gen: GenerateConfig, domain: str, examples: list[str]) -> list[dict[str, str]]:
    listed = "\n".join(f"{i}. {task}" for i, task in enumerate(examples, 1))
    return [{"role": "user", "content": gen.self_instruct.prompt.format(domain=domain, examples=listed, n=gen.self_instruct.new_per_prompt)}]


def run_self_instruct(
    domain: str, gen: GenerateConfig, model: ChatClient, params: GenerationParams, target: int, generator: str, *,
    keep: Callable[[list[Instance]], None], seed: int = 0
) -> Counter[str]:
    """Bootstrap until `target` answered instructions pass the filters (or the model stops producing new ones).

    Instances go to `keep` one answered chunk at a time (the stage writes them to shards), so a 500K baseline is
    never held in memory whole; the returned counts say what was kept and dropped.
    """
    rng = random.Random(seed)
    seeds = seed_tasks(domain, list(gen.scopes), list(gen.self_instruct.seeds))
    novelty = NoveltyFilter(gen.self_instruct.rouge)
    for task in seeds:
        novelty.remember(task)
    machine: list[str] = []
    unanswered: list[str] = []  # kept instructions not answered yet: answered first, before asking for more
    kept = 0
    counts: Counter[str] = Counter(seed_tasks=len(seeds))
    stalled = 0
    for round_index in range(gen.self_instruct.max_rounds):
        needed = target - kept
        if needed <= 0 or stalled >= STALL_ROUNDS:
            break
        counts["rounds"] += 1
        round_params = dataclasses.replace(params, seed=params.seed + round_index * (gen.max_retries + 1))
        if len(unanswered) < needed:
            new = _new_instructions(gen, domain, seeds, machine, novelty, rng, model, round_params, needed - len(unanswered), counts)
            machine.extend(new)
            unanswered.extend(new)
            stalled = 0 if new else stalled + 1
        batch, unanswered = unanswered[:needed], unanswered[needed:]  # answer only what the target still needs
        if not batch:
            continue
        for chunk_start in range(0, len(batch), ANSWER_CHUNK):
            instances = _answer(gen, domain, batch[chunk_start : chunk_start + ANSWER_CHUNK], model, round_params, generator, counts)
            keep(instances)
            kept += len(instances)
        log.info("self-instruct round %d: %d answered, %d/%d instances", round_index + 1, len(batch), kept, target)
    counts["instructions_unanswered"] = len(unanswered)
    counts["stopped_below_target"] = int(kept < target)
    counts["instances"] = kept
    counts["novelty_lsh_candidates"] = novelty.lsh_candidates
    counts["novelty_lcs_checks"] = novelty.lcs_checks
    return counts


def _answer(gen: GenerateConfig, domain: str, tasks: list[str], model: ChatClient, params: GenerationParams,
            generator: str, counts: Counter[str]) -> list[Instance]:
    """Answer `tasks` in one call; the answered ones that pass the answer checks, as instances."""
    answers = model.complete([with_answer_system_prompt(gen, [{"role": "user", "content": task}]) for task in tasks], params)
    counts["answer_calls"] += len(tasks)
    instances: list[Instance] = []
    for task, completion in zip(tasks, answers):
        if completion.finish_reason == "length":
            counts["answer_truncated"] += 1
            continue
        reason = reject_reason(task, completion.text, gen)
        if reason:
            counts[f"answer_{reason}"] += 1
            continue
        messages = [{"role": "user", "content": task}, {"role": "assistant", "content": completion.text.strip()}]
        instances.append(Instance(messages=messages, leaf_id=node_id([domain]), concept_path=[domain],
                                  source="self_instruct", generator=generator))
    return instances


def _new_instructions(gen: GenerateConfig, domain: str, seeds: list[str], machine: list[str], novelty: NoveltyFilter,
                      rng: random.Random, model: ChatClient, params: GenerationParams, wanted: int,
                      counts: Counter[str]) -> list[str]:
    """One round of instruction bootstrapping: enough prompts for `wanted` new tasks, filtered and novel."""
    n_prompts = max(gen.self_instruct.prompts_per_round, math.ceil(wanted / gen.self_instruct.new_per_prompt))
    prompts = []
    for _ in range(n_prompts):
        n_machine = min(2, len(machine))
        examples = rng.sample(seeds, min(len(seeds), gen.self_instruct.examples - n_machine)) + rng.sample(machine, n_machine)
        rng.shuffle(examples)
        prompts.append(_prompt(gen, domain, examples))
    asked = ask(model, prompts, params, lambda text: parse_list(text, clean_item), max_retries=gen.max_retries, cut=drop_last,
                reject_foreign_script=True)
    counts["instruction_calls"] += sum(a.attempts for a in asked)
    new: list[str] = []
    for result in tqdm(asked, desc="self-instruct novelty", unit="reply", leave=False):  # 23 min for 500K tasks on 2 CPU cores
        if result.value is None:
            counts["unparsable_instruction_replies"] += 1
            continue
        items = list(result.value)  # without the item the cut fell in
        if result.completion.finish_reason == "length":
            counts["truncated_instruction_lists"] += 1
        for instruction in items:
            reason = unsuitable(instruction)
            if reason:
                counts[f"instruction_{reason}"] += 1
            elif not novelty.add(instruction):
                counts["instruction_not_novel"] += 1
            else:
                new.append(instruction)
    counts["instructions_kept"] += len(new)
    return new
