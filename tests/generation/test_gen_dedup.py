"""MinHash-LSH near-duplicate detection: paraphrases caught, distinct questions kept, deterministic; Self-Instruct novelty."""

from __future__ import annotations

from typing import Iterable

import pytest

from unifit.dedup import NearDuplicateIndex, shingles

DISTINCT = [
    "What is DNS cache poisoning and how does an attacker exploit a resolver?",
    "How do SPF, DKIM and DMARC work together to stop email spoofing?",
    "Why does BGP route hijacking affect traffic far beyond the victim network?",
    "Which certificate fields does a browser check before trusting a TLS connection?",
    "How can a CDN absorb a volumetric DDoS attack without overloading the origin?",
    "What is DNS cache poisoning prevention with DNSSEC validation on resolvers?",
]
PARAPHRASES = [
    "What is DNS cache poisoning, and how does an attacker exploit a resolver?",
    "how do SPF, DKIM, and DMARC work together to stop email spoofing",
    "Why does BGP route hijacking affect traffic far beyond the victim's network?",
]


def dedup_texts(items: Iterable[tuple[str, str]], threshold: float, shingle_size: int) -> list[str]:
    """Keys of the (key, text) items kept, in order, the way the generate stage runs the index over its shards."""
    index = NearDuplicateIndex(threshold, shingle_size)
    return [key for key, text in items if index.add(key, text)]


def test_shingles_are_word_ngrams() -> None:
    assert shingles("What is DNS?", 2) == {"what is", "is dns"}
    assert shingles("DNS", 2) == {"dns"}


def test_paraphrases_caught_and_distinct_questions_kept() -> None:
    items = [(f"d{i}", t) for i, t in enumerate(DISTINCT)] + [(f"p{i}", t) for i, t in enumerate(PARAPHRASES)]
    kept = dedup_texts(items, threshold=0.8, shingle_size=2)
    assert kept == [f"d{i}" for i in range(len(DISTINCT))]


def test_first_of_a_group_wins_and_result_is_deterministic() -> None:
    items = [("p0", PARAPHRASES[0]), ("d0", DISTINCT[0]), ("d1", DISTINCT[1])]
    assert dedup_texts(items, 0.8, 2) == ["p0", "d1"] == dedup_texts(items, 0.8, 2)


def test_exact_key_repeat_rejected_and_similar_names_the_match() -> None:
    index = NearDuplicateIndex(0.8, 2)
    assert index.add("a", DISTINCT[0]) and not index.add("a", "totally different words here now")
    assert index.similar(index.signature(PARAPHRASES[0]), 0.8) == ["a"] and index.similar(index.signature(DISTINCT[2]), 0.0) == []
    assert not index.add("b", PARAPHRASES[0]) and index.add("c", DISTINCT[2])


def test_scales_linearly_on_many_distinct_items() -> None:
    import time

    items = [(str(i), f"question number {i} about topic {i * 7919 % 10007} and detail {i * 104729 % 1000003}") for i in range(3000)]
    start = time.perf_counter()
    kept = dedup_texts(items, 0.8, 2)
    assert len(kept) == 3000 and time.perf_counter() - start < 30


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.85])
def test_self_instruct_novelty_is_rouge_against_every_kept_task(threshold: float) -> None:
    """The candidate keys change the cost, not the verdict.

    600 tasks kept in order as ROUGE-L against every kept task would keep them: 12 to 16 tokens (keyed by
    3-subsets), 1 to 4 (too short for 3-subset keys) and 22 to 47 (too many 3-subsets), a third of them variants
    of earlier ones (words replaced, one inserted). Every verdict is the same, across the filter's rebuilds (at 4,
    16, 64 and 256 kept); from 0.7 up the keys propose under a tenth of the pairs a full comparison scores.
    """
    import itertools
    import random

    from rouge_score import rouge_scorer

    from unifit.generation.self_instruct import NoveltyFilter

    rng = random.Random(1)
    words = [f"w{i}" for i in range(300)] + ["the", "a", "of", "to", "when", "with"] * 10
    tasks: list[str] = []
    for _ in range(600):
        kind = rng.random()
        if tasks and kind < 0.3:
            variant = rng.choice(tasks).split()
            for _ in range(rng.randint(1, 5)):
                variant[rng.randrange(len(variant))] = rng.choice(words)
            if rng.random() < 0.3:
                variant.insert(rng.randrange(len(variant)), rng.choice(words))
            tasks.append(" ".join(variant))
        elif kind < 0.4:
            tasks.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))))
        elif kind < 0.5:
            tasks.append("Explain how " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 45))))
        else:
            tasks.append("Explain how " + " ".join(rng.choice(words) for _ in range(rng.randint(10, 14))))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    novelty = NoveltyFilter(threshold)
    kept_by_rouge: list[str] = []
    for task in tasks:
        closest = max((scorer.score(kept, task)["rougeL"].fmeasure for kept in kept_by_rouge), default=0.0)
        assert novelty.is_novel(task) == (closest <= threshold), f"{task!r}: ROUGE-L {closest:.3f} with a kept task"
        if closest <= threshold:
            kept_by_rouge.append(task)
            novelty.remember(task)
    assert 350 < len(kept_by_rouge) < 580  # the variants make both verdicts common
    pairs = len(tasks) * len(kept_by_rouge) / 2
    assert novelty.lcs_checks <= novelty.candidates < pairs / (10 if threshold >= 0.7 else 4)  # fewer shared tokens suffice at 0.5
    # in batches, as run_self_instruct adds them: a task's near-copy is often in its own batch, and batches span rebuilds
    batched, verdicts, start = NoveltyFilter(threshold), [], 0
    for size in itertools.cycle([1, 7, 60, 250]):
        verdicts += batched.add_many(tasks[start : start + size])
        start += size
        if start >= len(tasks):
            break
    assert [task for task, novel in zip(tasks, verdicts) if novel] == kept_by_rouge


def test_band_index_proposes_what_datasketch_lsh_proposes() -> None:
    """Same candidates as MinHashLSH for the same bands, across the buffer and several merged levels."""
    import random

    from datasketch import MinHashLSH

    from unifit.dedup import BandIndex, minhash

    rng = random.Random(3)
    words = [f"w{i}" for i in range(400)] + ["the", "of", "how"] * 20
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(40 * BandIndex.BUFFER + 200)]
    reference = MinHashLSH(threshold=0.4, num_perm=128)
    bands = BandIndex(reference.b, reference.r)
    for row, text in enumerate(texts[:-300]):
        signature = minhash(text, 1)
        reference.insert(row, signature)
        bands.insert(row, bands.keys(signature.hashvalues))
    assert len(bands._keys._levels) >= 2 and bands._keys._buffered  # flushed buffers merged into levels, a part-full buffer
    proposed = 0
    for text in texts[-300:] + texts[:50]:
        signature = minhash(text, 1)
        expected = sorted(reference.query(signature))
        assert bands.query(bands.keys(signature.hashvalues)).tolist() == expected
        proposed += len(expected)
    assert proposed > 350  # the queries do find candidates (each indexed text finds itself, the others some)


@pytest.mark.parametrize("filter_bits", [0, 10])
def test_key_index_finds_the_rows_a_dict_of_sets_finds(filter_bits: int) -> None:
    """Rows under any of the queried keys, each once, sorted: from a bulk level, flushed and merged levels and the buffer, with
    and without the bit filter (at 10 bits most unindexed keys pass it, so its misses are exercised too)."""
    import numpy as np

    from unifit.dedup import KeyIndex

    rng = np.random.default_rng(5)
    # small keys, keys over the whole 64-bit range and its two ends: the levels bucket keys by their mixed top bits
    universe = np.unique(np.concatenate([np.arange(300, dtype=np.uint64), rng.integers(0, 2**64 - 1, size=198, dtype=np.uint64, endpoint=True),
                                         np.array([2**63, 2**64 - 1], dtype=np.uint64)]))
    indexed = universe[:400]  # the rest are only ever queried
    index, reference = KeyIndex(buffer=64, filter_bits=filter_bits), {}
    bulk_rows = rng.integers(0, 50, size=300)
    bulk_keys = rng.choice(indexed, size=300)
    index.bulk_insert(bulk_rows, bulk_keys)
    for row, key in zip(bulk_rows.tolist(), bulk_keys.tolist()):
        reference.setdefault(key, set()).add(row)
    for row in range(50, 120):
        keys = rng.choice(indexed, size=int(rng.integers(0, 9)), replace=False)
        index.insert(row, keys)
        for key in keys.tolist():
            reference.setdefault(key, set()).add(row)
    assert len(index._levels) >= 2 and len(index) - index._buffered > len(bulk_keys) and index._buffered  # flushes merged; a part-full buffer
    for _ in range(200):
        keys = rng.choice(universe, size=int(rng.integers(0, 12)), replace=False)
        expected = sorted(set().union(*(reference.get(key, set()) for key in keys.tolist())))
        assert index.query(keys).tolist() == expected
    groups = [rng.choice(universe, size=int(rng.integers(0, 12)), replace=False) for _ in range(50)]
    expected_groups = [sorted(set().union(*(reference.get(key, set()) for key in keys.tolist()))) for keys in groups]
    assert [rows.tolist() for rows in index.query_many(groups)] == expected_groups  # every group at once, empty ones too


def test_bit_parallel_lcs_is_rouge_scores_lcs() -> None:
    """The novelty filter's LCS equals rouge_score's dynamic-programming table on 2,000 random pairs (repeated tokens,
    empty and 70-token sequences among them)."""
    import random

    from rouge_score.rouge_scorer import _lcs_table

    from unifit.generation.self_instruct import _lcs_length, _match_masks

    rng = random.Random(2)
    for _ in range(2000):
        a, b = ([rng.randrange(8) for _ in range(rng.choice([0, 3, 12, 70]))] for _ in range(2))
        assert _lcs_length(_match_masks(a), len(a), b) == _lcs_table(a, b)[-1][-1]
