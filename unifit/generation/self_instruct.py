"""Self-Instruct baseline (Wang et al. 2023): bootstrap instructions from seed tasks, then answer them.

Same domain, same generator model and the same target size as the concept tree, so the diversity and
win-rate comparisons measure the method, not the budget. Each round: sample in-context tasks (seed
tasks plus up to 2 machine-generated ones), ask for new tasks, keep those that pass Wang et al.'s
heuristic filters and are novel (ROUGE-L F1 <= threshold against every kept task), answer them.
Novelty is exact, but checked only against the kept tasks that share enough tokens to exceed the threshold,
found through keys of three rarer tokens (`NoveltyFilter`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import random
import re
from collections import Counter, defaultdict
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from unifit.config import GenerateConfig
from unifit.dedup import KeyIndex, sorted_unique
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
NOVELTY_BATCH = 256  # tasks whose candidates in the pool are searched at once (each also checked against those kept before it)
ANSWER_CHUNK = 8192  # tasks answered per call: enough to fill every engine, and a round holds only one chunk's answers
SUBSET_SIZE = 3  # k of the novelty filter's k-subset prefix keys
MAX_SUBSET_KEYS = 220  # C(12, 3): tasks with longer prefixes (over ~21 tokens at ROUGE-L 0.7) are keyed by single tokens
SUBSET_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], dtype=np.uint64)  # odd: a 3-subset's key
SUBSET_FILTER_BITS = 30  # 128 MB: ~3% of unindexed keys pass it with 31M keys indexed (500K tasks)
PADDED_TOKENS = 32  # token ids kept per task in one matrix for the numpy bound (the rest are counted as shared)
REBUILD_GROWTH = 4  # the frequency order and the keys are rebuilt each time the pool grows this many times


TaskKeys = tuple[Optional[np.ndarray], np.ndarray]  # a task's 3-subset keys (None: keyed by singles) and single-element keys


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
    """ROUGE-L novelty against every kept instruction, exact, without comparing a new task with each kept one.

    ROUGE-L F1 = 2·LCS / (len a + len b), and the LCS is at most the overlap O of the two token multisets, itself
    at most the shorter length; so F1 > θ needs O ≥ t(len) = ⌊θ/(2-θ)·len⌋ + 1 for both lengths (7 of 12 tokens at
    θ = 0.7). Candidates come from a prefix filter (Bayardo et al. 2007) with k-subset keys (Wang et al. 2016):
    a task's elements are its tokens (a repeat is an element of its own) ordered rarest first; two tasks sharing
    O ≥ t elements have their first k shared elements among both tasks' first len - t + k, so keying each task
    by every k-subset of those finds every pair that can pass. With k = 3 a key is three of a task's rarer tokens:
    single tokens ("how", "the") would propose much of the pool for every new task, which grows as its square.

    Tasks whose prefix has more than `MAX_SUBSET_KEYS` 3-subsets, or t < 3, are keyed by their len - t + 1 single
    elements instead (k = 1), in two indexes: one of every task, which those tasks query, and one of the tasks
    without subset keys, which the others query. The frequency order is fixed between rebuilds, which come
    each time the pool has grown `REBUILD_GROWTH`-fold. `add_many` searches the indexes once for a batch of tasks
    (a numpy call per task per index level would cost more than the search); each task of the batch is also a
    candidate of the later ones. Candidates are scored by LCS only when the tokens they share with the new task
    could reach the threshold (one numpy pass over their token ids), with a bit-parallel LCS; `candidates` counts
    those the keys found, `lcs_checks` the LCS computed.
    """

    def __init__(self, rouge_threshold: float) -> None:
        from rouge_score.tokenizers import DefaultTokenizer

        self.threshold = rouge_threshold
        self._share = rouge_threshold / (2 - rouge_threshold)  # O must exceed this share of either length
        self._tokenizer = DefaultTokenizer(use_stemmer=False)  # what RougeScorer(["rougeL"], use_stemmer=False) uses
        self._ids: dict[str, int] = {}
        self._task_frequency: list[int] = []  # per token id: kept tasks holding it
        self._order: np.ndarray = np.empty(0, dtype=np.int64)  # per token id: its frequency when the keys were built
        self._tokens: list[np.ndarray] = []  # per kept task, its token ids (int32)
        self._lengths = np.empty(1024, dtype=np.int32)
        self._padded = np.full((1024, PADDED_TOKENS), -1, dtype=np.int32)  # first token ids of each task, for the numpy bound
        # per token id, whether the task being checked holds it; longer than the vocabulary, so that the padding's -1
        # reads its last entry, never set
        self._present = np.zeros(1024, dtype=bool)
        self._rebuild_at = REBUILD_GROWTH
        self._indexes = _TaskIndexes()
        self.candidates = 0
        self.lcs_checks = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def is_novel(self, text: str) -> bool:
        """No kept task has a ROUGE-L F1 above the threshold with `text`."""
        tokens = self._token_ids(text)
        keys = self._keys(tokens)
        rows = self._indexes.candidates([keys])[0]
        self.candidates += len(rows)
        return self._novel_among(tokens, rows)

    def remember(self, text: str) -> None:
        """Add `text` to the pool unconditionally (seed tasks, which may resemble each other)."""
        tokens = self._token_ids(text)
        self._remember(tokens, self._keys(tokens))
        self._rebuild_if_due()

    def add_many(self, texts: Sequence[str]) -> list[bool]:
        """Keep each text in turn if it is novel (True where kept), with the pool's indexes searched once for all.

        A text's candidates are the kept tasks its keys find in the pool as it was before the call, and every text
        kept before it in this call (the numpy bound discards most of them as cheaply as a key lookup would)."""
        tokens = [self._token_ids(text) for text in texts]
        keys = [self._keys(task) for task in tokens]  # computed once, for the checks and the indexes
        first_row = len(self._tokens)
        verdicts: list[bool] = []
        for task, task_keys, in_pool in zip(tokens, keys, self._indexes.candidates(keys)):
            self.candidates += len(in_pool)
            rows = np.concatenate([in_pool, np.arange(first_row, len(self._tokens))]) if task_keys is not None else in_pool
            novel = self._novel_among(task, rows)
            if novel:
                self._remember(task, task_keys)
            verdicts.append(novel)
        self._rebuild_if_due()  # between calls only: every key of a call is made in one frequency order
        return verdicts

    def _token_ids(self, text: str) -> np.ndarray:
        ids = self._ids
        return np.fromiter((ids.setdefault(token, len(ids)) for token in self._tokenizer.tokenize(text)), dtype=np.int32)

    def _required(self, length: int) -> int:
        """t(length): the fewest shared tokens with which a task of `length` tokens can pass the threshold."""
        return math.floor(self._share * length - 1e-9) + 1

    def _elements(self, tokens: np.ndarray) -> np.ndarray:
        """The task's elements (token id, and which repeat of it) as 64-bit values, rarest first."""
        repeat = np.zeros(len(tokens), dtype=np.int64)
        if len(np.unique(tokens)) < len(tokens):
            seen: Counter[int] = Counter()
            for i, token in enumerate(tokens.tolist()):
                repeat[i] = seen[token]
                seen[token] += 1
        ids = tokens.astype(np.int64)
        frequency = np.zeros(len(ids), dtype=np.int64)  # tokens new since the last rebuild count as rarest
        known = ids < len(self._order)
        frequency[known] = self._order[ids[known]]
        order = np.lexsort((repeat, ids, frequency))
        return ((repeat[order] << 32) | ids[order]).astype(np.uint64)

    def _keys(self, tokens: np.ndarray) -> Optional[TaskKeys]:
        """(3-subset keys or None when the task is keyed by single elements, its single-element keys); None for a task
        without tokens, which has ROUGE-L 0 with anything."""
        length = len(tokens)
        if not length:
            return None
        elements = self._elements(tokens)
        required = self._required(length)
        singles = elements[: length - required + 1]
        prefix = length - required + SUBSET_SIZE
        if required < SUBSET_SIZE or math.comb(prefix, SUBSET_SIZE) > MAX_SUBSET_KEYS:
            return None, singles
        subsets = _subsets(prefix)
        keys = (elements[subsets] * SUBSET_MULTIPLIERS).sum(axis=1, dtype=np.uint64)
        return keys, singles

    def _novel_among(self, tokens: np.ndarray, rows: np.ndarray) -> bool:
        """No kept task among `rows` (the candidates) has a ROUGE-L F1 above the threshold with `tokens`."""
        from rouge_score.scoring import fmeasure

        length = len(tokens)
        if not len(rows):
            return True
        lengths = self._lengths[rows]
        if len(self._ids) >= len(self._present):
            self._present = np.zeros(2 * len(self._ids) + 1, dtype=bool)
        self._present[tokens] = True
        shared = np.count_nonzero(self._present[self._padded[rows]], axis=1) + np.maximum(lengths - PADDED_TOKENS, 0)
        self._present[tokens] = False
        shared = np.minimum(shared, length)  # bounds the multiset overlap
        possible = 2 * shared > self.threshold * (lengths + length) - 1e-9
        matches = _match_masks(tokens.tolist())
        for row in rows[possible].tolist():
            self.lcs_checks += 1
            kept = self._tokens[row]
            common = _lcs_length(matches, length, kept.tolist())
            # as rouge_score's _score_lcs(kept, new) computes F1 (same float operations, so the same verdict)
            if common and fmeasure(common / length, common / len(kept)) > self.threshold:
                return False
        return True

    def _remember(self, tokens: np.ndarray, keys: Optional[TaskKeys]) -> None:
        """Keep a task: its tokens, the bound's data, its tokens' counts and its keys in the indexes."""
        row = len(self._tokens)
        if row == len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.empty_like(self._lengths)])
            self._padded = np.concatenate([self._padded, np.full_like(self._padded, -1)])
        self._tokens.append(tokens)
        self._lengths[row] = len(tokens)
        self._padded[row, : min(len(tokens), PADDED_TOKENS)] = tokens[:PADDED_TOKENS]
        self._task_frequency.extend([0] * (len(self._ids) - len(self._task_frequency)))  # ids of tokens seen since
        for token in np.unique(tokens).tolist():
            self._task_frequency[token] += 1
        self._indexes.insert(row, keys)

    def _rebuild_if_due(self) -> None:
        """Fix the frequency order of the pool as it is now and key every kept task by it, each index one level,
        once the pool has grown `REBUILD_GROWTH`-fold since the last time."""
        if len(self._tokens) < self._rebuild_at:
            return
        while self._rebuild_at <= len(self._tokens):
            self._rebuild_at *= REBUILD_GROWTH
        self._order = np.asarray(self._task_frequency, dtype=np.int64)
        self._indexes = _TaskIndexes()
        collected: dict[KeyIndex, tuple[list[np.ndarray], list[np.ndarray]]] = defaultdict(lambda: ([], []))
        for row, tokens in enumerate(self._tokens):
            for index, keys in self._indexes.placements(self._keys(tokens)):
                collected[index][0].append(np.full(len(keys), row, dtype=np.int32))
                collected[index][1].append(keys)
        for index, (rows, keys) in collected.items():
            index.bulk_insert(np.concatenate(rows), np.concatenate(keys))


class _TaskIndexes:
    """Where kept tasks are found by their keys: their 3-subset keys, and single-element keys in two more maps, one
    of every task (which tasks keyed by singles query) and one of the tasks keyed by singles (which the others query)."""

    def __init__(self) -> None:
        # most of a new task's 3-subsets are in no kept task: the bit filter spares them the search
        self.subsets = KeyIndex(filter_bits=SUBSET_FILTER_BITS)
        self.every_single, self.other_single = KeyIndex(), KeyIndex()

    def placements(self, keys: Optional[TaskKeys]) -> list[tuple[KeyIndex, np.ndarray]]:
        """The maps a kept task goes in, with its keys for each (none for an empty task: it never passes)."""
        if keys is None:
            return []
        subset_keys, singles = keys
        if subset_keys is None:
            return [(self.every_single, singles), (self.other_single, singles)]
        return [(self.every_single, singles), (self.subsets, subset_keys)]

    def insert(self, row: int, keys: Optional[TaskKeys]) -> None:
        for index, index_keys in self.placements(keys):
            index.insert(row, index_keys)

    def candidates(self, tasks: Sequence[Optional[TaskKeys]]) -> list[np.ndarray]:
        """Per task, the kept rows its keys find (sorted, each once): each map searched once for all the tasks."""
        nothing = np.empty(0, dtype=np.uint64)
        subset_keyed = [keys is not None and keys[0] is not None for keys in tasks]
        by_subsets = self.subsets.query_many([keys[0] if by else nothing for keys, by in zip(tasks, subset_keyed)])
        by_other = self.other_single.query_many([keys[1] if by else nothing for keys, by in zip(tasks, subset_keyed)])
        by_every = self.every_single.query_many([keys[1] if keys is not None and not by else nothing for keys, by in zip(tasks, subset_keyed)])
        return [_union(*rows) for rows in zip(by_subsets, by_other, by_every)]


def _union(*rows: np.ndarray) -> np.ndarray:
    """Sorted rows, each once, of sorted arrays of unique rows (most of them empty)."""
    found = [r for r in rows if len(r)]
    if len(found) <= 1:
        return found[0] if found else np.empty(0, dtype=np.int64)
    return sorted_unique(np.concatenate(found))


def _match_masks(tokens: list[int]) -> dict[int, int]:
    """Per token, the bit set of its positions in `tokens` (for `_lcs_length`)."""
    masks: dict[int, int] = {}
    for position, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | 1 << position
    return masks


def _lcs_length(masks: dict[int, int], length: int, other: list[int]) -> int:
    """Length of the longest common subsequence of a sequence of `length` tokens (its `_match_masks`) and `other`.

    Bit-parallel (Allison & Dix 1986, Hyyrö 2004): one big-integer step per token of `other`, where the
    dynamic-programming table costs `length` Python steps per token.
    """
    ones = (1 << length) - 1
    row = ones
    for token in other:
        matched = row & masks.get(token, 0)
        row = ((row + matched) | (row - matched)) & ones
    return length - row.bit_count()


@functools.lru_cache(maxsize=None)
def _subsets(prefix: int) -> np.ndarray:
    """Every SUBSET_SIZE-subset of range(prefix), in order, as rows of indices."""
    return np.array(list(itertools.combinations(range(prefix), SUBSET_SIZE)), dtype=np.int64).reshape(-1, SUBSET_SIZE)


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
    counts["novelty_candidates"] = novelty.candidates
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
    suitable: list[str] = []
    for result in asked:
        if result.value is None:
            counts["unparsable_instruction_replies"] += 1
            continue
        if result.completion.finish_reason == "length":
            counts["truncated_instruction_lists"] += 1
        for instruction in result.value:  # without the item the cut fell in
            reason = unsuitable(instruction)
            if reason:
                counts[f"instruction_{reason}"] += 1
            else:
                suitable.append(instruction)
    new: list[str] = []
    with tqdm(total=len(suitable), desc="self-instruct novelty", unit="task", leave=False) as progress:
        for start in range(0, len(suitable), NOVELTY_BATCH):
            batch = suitable[start : start + NOVELTY_BATCH]
            verdicts = novelty.add_many(batch)
            new.extend(task for task, novel in zip(batch, verdicts) if novel)
            progress.update(len(batch))
    counts["instruction_not_novel"] += len(suitable) - len(new)
    counts["instructions_kept"] += len(new)
    return new
