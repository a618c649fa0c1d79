"""MinHash-LSH near-duplicate detection: paraphrases caught, distinct questions kept, deterministic."""

from __future__ import annotations

from typing import Iterable

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


def test_exact_key_repeat_rejected_and_candidates_name_the_match() -> None:
    index = NearDuplicateIndex(0.8, 2)
    assert index.add("a", DISTINCT[0]) and not index.add("a", "totally different words here now")
    assert index.candidates(PARAPHRASES[0]) == ["a"] and index.candidates(DISTINCT[2]) == []
    assert not index.add("b", PARAPHRASES[0]) and index.add("c", DISTINCT[2])


def test_scales_linearly_on_many_distinct_items() -> None:
    import time

    items = [(str(i), f"question number {i} about topic {i * 7919 % 10007} and detail {i * 104729 % 1000003}") for i in range(3000)]
    start = time.perf_counter()
    kept = dedup_texts(items, 0.8, 2)
    assert len(kept) == 3000 and time.perf_counter() - start < 30
