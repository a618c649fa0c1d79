"""Held-out test questions: new questions about random concept-tree leaves, none near-duplicating training data.

A test question that is a near-copy of a training instruction would measure memorisation, so every
candidate is checked (MinHash LSH, the same index the generate stage deduplicates with) against every
user turn of every training instance and against the questions already accepted. Rejected candidates
(unparseable, cut off by the token limit before a "?", in another script than the prompt, near-duplicate)
are replaced by asking again about other random leaves, for a bounded number of rounds; every rejection is counted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from unifit.fingerprint import fingerprint
from unifit.dedup import NearDuplicateIndex
from unifit.text import foreign_script
from unifit.concept_tree import Node
from unifit.llm.base import ChatClient, FreeTextModel, GenerationParams, as_client

QUESTION_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("question", pa.string()),
    ("leaf_id", pa.string()),
    ("concept_path", pa.list_(pa.string())),
])
_LABEL = re.compile(r"^\s*(?:\*\*)?\s*(?:new\s+)?(?:question|q)\s*\d*\s*(?:\*\*)?\s*[:.)\-]\s*(?:\*\*)?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"^\s*\d+\s*[.)]\s+")
_ANSWER = re.compile(r"\n\s*(?:\*\*)?\s*(?:answer|a)\s*\d*\s*(?:\*\*)?\s*:", re.IGNORECASE)
MIN_CHARS, MAX_CHARS = 10, 1000


def parse_test_question(text: str) -> Optional[str]:
    """The question in a reply: labels ("Question 1:", "1."), any answer part and chatter after the first "?" removed.

    None if nothing usable is left. Small models often keep talking after the question; cutting at the
    first question mark keeps the question and drops the rest.
    """
    text = _ANSWER.split("\n" + text.strip(), maxsplit=1)[0]
    if "?" in text:
        text = text[: text.index("?") + 1]
    text = _NUMBER.sub("", _LABEL.sub("", text.strip())).strip().strip('"').strip()
    text = " ".join(text.split())
    if not (MIN_CHARS <= len(text) <= MAX_CHARS) or not re.search(r"[^\W\d_]", text):
        return None
    return text


def training_index(texts: Iterable[str], threshold: float, shingle_size: int) -> NearDuplicateIndex:
    """LSH index over every training text (user turns), so candidates are checked in O(1) each.

    Every text is inserted, near-duplicates of each other included: no check among them is needed (a test question
    is compared with all of them), and skipping it took 2.7x less CPU (8.3 -> 3.1 s per 40K stand-in questions).
    """
    index = NearDuplicateIndex(threshold, shingle_size)
    for i, text in enumerate(tqdm(texts, desc="indexing training questions", unit="q", leave=False)):
        index.insert(f"train:{i}", index.signature(text))
    return index


def generate_test_questions(generator: ChatClient | FreeTextModel, leaves: Sequence[Node], index: NearDuplicateIndex, *, n: int, domain: str,
                            prompt: str, params: GenerationParams, seed: int, max_rounds: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Up to `n` accepted questions (rows of QUESTION_SCHEMA) and the counts of what was rejected.

    Each round asks about random leaves (with replacement) for the questions still missing. A leaf
    drawn twice in a round is asked in separate calls with different seeds, so sampling backends (and
    the completion cache) give distinct candidates. Accepted questions are added to `index`.
    """
    if not leaves:
        raise ValueError("the concept tree has no leaves to ask test questions about")
    client = as_client(generator)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    counts = {"asked": 0, "unparseable": 0, "truncated": 0, "wrong_language": 0, "near_duplicates": 0, "rounds": 0}
    for round_ in tqdm(range(max_rounds), desc="test questions", unit="round", leave=False):
        need = n - len(rows)
        if need <= 0:
            break
        counts["rounds"] += 1
        picks = [leaves[i] for i in rng.integers(0, len(leaves), size=need)]
        groups: list[list[Node]] = []  # groups[j] holds the (j+1)-th draw of each leaf in this round
        seen: dict[str, int] = {}
        for leaf in picks:
            j = seen.get(leaf.id, 0)
            seen[leaf.id] = j + 1
            if j == len(groups):
                groups.append([])
            groups[j].append(leaf)
        for j, group in enumerate(groups):
            conversations = [[{"role": "user", "content": prompt.format(leaf=leaf.concept, path=" > ".join(leaf.path), domain=domain)}]
                             for leaf in group]
            call_params = dataclasses.replace(params, seed=params.seed + 1000 * round_ + j)
            replies = client.complete(conversations, call_params)
            counts["asked"] += len(group)
            for leaf, conversation, reply in zip(group, conversations, replies):
                question = parse_test_question(reply.text)
                if question is None:
                    counts["unparseable"] += 1
                    continue
                if reply.finish_reason == "length" and not question.endswith(("?", "？")):  # cut off inside the question
                    counts["truncated"] += 1
                    continue
                if foreign_script(question, conversation[0]["content"]):
                    counts["wrong_language"] += 1
                    continue
                question_id = fingerprint(question)[:16]
                if not index.add(f"test:{question_id}", question):
                    counts["near_duplicates"] += 1
                    continue
                rows.append({"question_id": question_id, "question": question, "leaf_id": leaf.id, "concept_path": list(leaf.path)})
    return rows, counts
