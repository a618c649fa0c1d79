"""Near-duplicate detection with MinHash LSH over word shingles — linear in the number of items.

Deterministic: fixed MinHash seed and permutations, items visited in the given order, the first of a
near-duplicate group kept. Run over the raw shards in shard order, it gives the same result whether
the shards were written in one run or across resumed runs.
"""

from __future__ import annotations

import functools
import re
from typing import Any

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

    LSH proposes candidates; a candidate counts only if the estimated Jaccard similarity reaches the
    threshold, which removes most LSH false positives without any pairwise loop. Per accepted text it holds the
    LSH band keys and the signature's hash values (the share of equal values estimates the Jaccard similarity).
    """

    def __init__(self, threshold: float, shingle_size: int, num_perm: int = NUM_PERM) -> None:
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.shingle_size = shingle_size
        self.num_perm = num_perm
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: dict[str, Any] = {}  # key -> hash values (a numpy array)

    def _find(self, signature) -> str | None:
        """Key of an accepted text whose estimated Jaccard similarity with `signature` reaches the threshold, or None."""
        for key in sorted(self._lsh.query(signature)):
            if (signature.hashvalues == self._signatures[key]).mean() >= self.threshold:
                return key
        return None

    def candidates(self, text: str) -> list[str]:
        """Keys LSH proposes as similar to `text` (sorted, for determinism), before any Jaccard check."""
        return sorted(self._lsh.query(minhash(text, self.shingle_size, self.num_perm)))

    def insert(self, key: str, text: str) -> None:
        """Index `text` unconditionally (the caller has decided it is novel)."""
        self._store(key, minhash(text, self.shingle_size, self.num_perm))

    def add(self, key: str, text: str) -> bool:
        """Accept `text` under `key` unless it near-duplicates an accepted text; True if accepted."""
        signature = minhash(text, self.shingle_size, self.num_perm)
        if key in self._signatures or self._find(signature) is not None:
            return False
        self._store(key, signature)
        return True

    def _store(self, key: str, signature) -> None:
        self._lsh.insert(key, signature)
        self._signatures[key] = signature.hashvalues
