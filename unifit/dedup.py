"""Near-duplicate detection with MinHash LSH over word shingles — linear in the number of items.

Deterministic: fixed MinHash seed and permutations, items visited in the given order, the first of a
near-duplicate group kept. Run over the raw shards in shard order, it gives the same result whether
the shards were written in one run or across resumed runs.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

NUM_PERM = 128
_WORD = re.compile(r"\w+", re.UNICODE)
_POSSESSIVE = re.compile(r"'s\b")


def shingles(text: str, size: int) -> set[str]:
    """Word n-grams of `size` over the lower-cased words, possessives dropped (texts shorter than `size` give one shingle)."""
    words = _WORD.findall(_POSSESSIVE.sub("", text.casefold().replace("’", "'")))
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


@functools.lru_cache(maxsize=None)
def _permutations(num_perm: int) -> tuple[Any, str]:
    """The seeded hash permutations (and their scheme), drawn once: drawing them costs more than hashing a question."""
    from datasketch import MinHash

    template = MinHash(num_perm=num_perm, seed=1)
    return template.permutations, template.scheme


def minhash(text: str, size: int, num_perm: int = NUM_PERM):
    from datasketch import MinHash

    permutations, scheme = _permutations(num_perm)
    signature = MinHash(num_perm=num_perm, seed=1, permutations=permutations, scheme=scheme)
    signature.update_batch([s.encode("utf-8") for s in shingles(text, size)])
    return signature


class NearDuplicateIndex:
    """Keeps the texts it has accepted; `add` answers whether a new text is a near-duplicate of one of them.

    LSH proposes candidates; a candidate counts only if the estimated Jaccard similarity (the share of equal
    MinHash values) reaches the threshold, which removes most LSH false positives without a Python loop over them:
    the accepted texts' signatures are rows of one matrix, compared with the query's in a single numpy operation.
    """

    def __init__(self, threshold: float, shingle_size: int, num_perm: int = NUM_PERM) -> None:
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.shingle_size = shingle_size
        self.num_perm = num_perm
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._keys: list[str] = []  # row -> key (the LSH indexes rows)
        self._rows: dict[str, int] = {}
        # MinHash values are below 2**32 (datasketch masks them), so uint32 holds them exactly at half the memory.
        self._signatures = np.empty((1024, num_perm), dtype=np.uint32)

    def __len__(self) -> int:
        return len(self._keys)

    def similar(self, text: str, min_jaccard: float) -> list[str]:
        """Keys of accepted texts LSH proposes for `text` whose estimated Jaccard similarity is at least `min_jaccard`, oldest first."""
        return [self._keys[row] for row in self._similar_rows(minhash(text, self.shingle_size, self.num_perm), min_jaccard)]

    def _similar_rows(self, signature, min_jaccard: float) -> np.ndarray:
        rows = self._lsh.query(signature)
        if not rows:
            return np.empty(0, dtype=np.int64)
        rows = np.sort(np.fromiter(rows, dtype=np.int64, count=len(rows)))
        estimates = (self._signatures[rows] == signature.hashvalues.astype(np.uint32)).mean(axis=1)
        return rows[estimates >= min_jaccard]

    def insert(self, key: str, text: str) -> None:
        """Index `text` unconditionally (the caller has decided it is novel)."""
        self._store(key, minhash(text, self.shingle_size, self.num_perm))

    def add(self, key: str, text: str) -> bool:
        """Accept `text` under `key` unless it near-duplicates an accepted text; True if accepted."""
        signature = minhash(text, self.shingle_size, self.num_perm)
        if key in self._rows or len(self._similar_rows(signature, self.threshold)):
            return False
        self._store(key, signature)
        return True

    def _store(self, key: str, signature) -> None:
        row = len(self._keys)
        if row == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        self._signatures[row] = signature.hashvalues
        self._lsh.insert(row, signature)
        self._keys.append(key)
        self._rows[key] = row
