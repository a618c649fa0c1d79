"""Near-duplicate detection with MinHash LSH over word shingles — linear in the number of items.

Deterministic: fixed MinHash seed and permutations, items visited in the given order, the first of a
near-duplicate group kept. Run over the raw shards in shard order, it gives the same result whether
the shards were written in one run or across resumed runs.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

NUM_PERM = 128
KEY_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier: spreads keys over a KeyIndex's filter and buckets
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


class Level(NamedTuple):
    """A sorted run of a `KeyIndex`: its keys mixed (key × KEY_MIX, a bijection) and sorted, their rows, and where
    each bucket of mixed keys (their top `bits` bits) starts, so that finding a key costs one bucket, not a binary
    search over millions of keys (at 30M keys, ~10× less time per query)."""

    mixed: np.ndarray  # uint64, sorted
    rows: np.ndarray  # int32
    starts: np.ndarray  # int64, 2**bits + 1 entries: bucket b holds mixed[starts[b]:starts[b + 1]]
    shift: np.uint64  # 64 - bits


class KeyIndex:
    """A multimap from 64-bit keys to rows, in sorted numpy arrays: which rows hold any of a set of keys.

    16 to 20 bytes per (key, row) (key, row and bucket start) instead of a Python set and dict entry each. New
    pairs wait in a small buffer that queries scan; a full buffer becomes a sorted level, and levels merge pairwise
    like a binary counter, so an insert costs O(log n) amortised and a query one bucket lookup per level.
    """

    def __init__(self, buffer: int = 8192, filter_bits: int = 0) -> None:
        """`filter_bits`: with b > 0, a 2**b-bit filter of the indexed keys (2**(b-3) bytes) lets a query search the
        levels only for keys that may be indexed: worth it when most queried keys are not."""
        self._levels: list[Level] = []  # largest first
        self._filter_shift = np.uint64(64 - filter_bits)
        self._filter = np.zeros(2 ** filter_bits // 8 if filter_bits else 0, dtype=np.uint8)
        self._buffer_keys = np.empty(buffer, dtype=np.uint64)
        self._buffer_rows = np.empty(buffer, dtype=np.int32)
        self._buffered = 0

    def __len__(self) -> int:
        """Indexed (key, row) pairs."""
        return self._buffered + sum(len(level.rows) for level in self._levels)

    def insert(self, row: int, keys: np.ndarray) -> None:
        """Index `row` under each of `keys`."""
        self._mark(keys)
        while len(keys):
            room = min(len(keys), len(self._buffer_keys) - self._buffered)
            self._buffer_keys[self._buffered : self._buffered + room] = keys[:room]
            self._buffer_rows[self._buffered : self._buffered + room] = row
            self._buffered += room
            keys = keys[room:]
            if self._buffered == len(self._buffer_keys):
                self._flush()

    def query(self, keys: np.ndarray) -> np.ndarray:
        """Rows indexed under any of `keys`, sorted, each once."""
        return self.query_many([keys])[0]

    def query_many(self, groups: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`query` of each group of keys, the buffer and each level searched once for all of them (a numpy call
        costs microseconds whatever its size, so one call per level per group would cost more than the search)."""
        owners = np.repeat(np.arange(len(groups), dtype=np.uint64), [len(keys) for keys in groups])
        keys = np.concatenate(groups).astype(np.uint64) if len(owners) else np.empty(0, dtype=np.uint64)
        if len(self._filter) and len(keys):
            marked = self._marked(keys)
            keys, owners = keys[marked], owners[marked]
        found_owners, found_rows = [], []
        if len(keys) and self._buffered:
            order = np.argsort(keys)
            ordered = keys[order]
            buffered = self._buffer_keys[: self._buffered]
            first = np.searchsorted(ordered, buffered)
            hit = ordered[np.minimum(first, len(ordered) - 1)] == buffered  # most miss: the second search is for the hits
            first = first[hit]
            counts = np.searchsorted(ordered, buffered[hit], side="right") - first
            found_owners.append(owners[order[_ranges(first, counts)]])
            found_rows.append(np.repeat(self._buffer_rows[: self._buffered][hit], counts))
        mixed = keys * KEY_MIX
        for level in self._levels:
            bucket = (mixed >> level.shift).astype(np.int64)
            first = level.starts[bucket]
            counts = level.starts[bucket + 1] - first
            positions = _ranges(first, counts)
            matched = level.mixed[positions] == np.repeat(mixed, counts)
            found_owners.append(np.repeat(owners, counts)[matched])
            found_rows.append(level.rows[positions[matched]])
        if not found_owners:
            return [np.empty(0, dtype=np.int64) for _ in groups]
        pairs = sorted_unique((np.concatenate(found_owners) << np.uint64(32)) | np.concatenate(found_rows).astype(np.uint64))
        rows = (pairs & np.uint64(0xFFFFFFFF)).astype(np.int64)
        bounds = np.searchsorted(pairs >> np.uint64(32), np.arange(len(groups) + 1, dtype=np.uint64))
        return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def bulk_insert(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """Index each `rows[i]` under `keys[i]`, as one sorted level (faster to build and to query than inserts)."""
        self._mark(keys)
        if len(keys):
            self._levels.append(_sorted_level(keys.astype(np.uint64) * KEY_MIX, rows.astype(np.int32)))
            self._levels.sort(key=lambda level: -len(level.rows))

    def _filter_bits(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each key's byte in the filter and its bit there (from the key's mixed high bits)."""
        position = (keys.astype(np.uint64) * KEY_MIX) >> self._filter_shift
        return position >> np.uint64(3), (np.uint64(1) << (position & np.uint64(7))).astype(np.uint8)

    def _mark(self, keys: np.ndarray) -> None:
        if len(self._filter):
            byte, bit = self._filter_bits(keys)
            np.bitwise_or.at(self._filter, byte, bit)

    def _marked(self, keys: np.ndarray) -> np.ndarray:
        byte, bit = self._filter_bits(keys)
        return (self._filter[byte] & bit) != 0

    def _flush(self) -> None:
        self._levels.append(_sorted_level(self._buffer_keys * KEY_MIX, self._buffer_rows))
        self._buffered = 0
        while len(self._levels) > 1 and len(self._levels[-2].rows) <= len(self._levels[-1].rows):
            a, b = self._levels.pop(-2), self._levels.pop()
            self._levels.append(_sorted_level(np.concatenate([a.mixed, b.mixed]), np.concatenate([a.rows, b.rows])))


def _sorted_level(mixed: np.ndarray, rows: np.ndarray) -> Level:
    """A level of (mixed key, row) pairs, ordered by mixed key (copies: a level never shares memory with the
    buffer), with about one bucket per pair."""
    order = np.argsort(mixed, kind="stable")
    mixed, rows = mixed[order], rows[order]
    bits = max(1, len(mixed).bit_length() - 1)
    shift = np.uint64(64 - bits)
    starts = np.append(np.searchsorted(mixed, np.arange(2**bits, dtype=np.uint64) << shift), len(mixed))
    return Level(mixed, rows, starts, shift)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy 2's np.unique hashes integers first, several times slower on a million of them."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The positions of every range [start, start + count), concatenated in order."""
    ends = np.cumsum(counts)
    return np.repeat(starts - ends + counts, counts) + np.arange(ends[-1] if len(ends) else 0)


class BandIndex:
    """MinHash LSH bands in a `KeyIndex`: which indexed rows share at least one band with a signature.

    The same candidates as datasketch's MinHashLSH for the same bands and rows (a band is keyed by a 64-bit hash
    of its values, different per band), in 16 to 20 bytes per row and band: 32 bands take ~0.6 MB per 1,000 rows,
    where datasketch's dicts of sets took 11.3 MB per 1,000 Self-Instruct tasks.
    """

    BUFFER = 256  # rows in the buffer, which every query scans (a level costs a query one bucket lookup)

    def __init__(self, bands: int, rows_per_band: int, seed: int = 1) -> None:
        self.bands, self.rows_per_band = bands, rows_per_band
        # Per band and position an odd 64-bit multiplier: the band's key is the wrapping sum of value x multiplier.
        self._multipliers = np.random.default_rng(seed).integers(1, 2**63, size=(bands, rows_per_band), dtype=np.uint64) | np.uint64(1)
        self._keys = KeyIndex(self.BUFFER * bands)

    def keys(self, hashvalues: np.ndarray) -> np.ndarray:
        """One key per band of a signature's hash values."""
        values = hashvalues[: self.bands * self.rows_per_band].reshape(self.bands, self.rows_per_band).astype(np.uint64)
        return (values * self._multipliers).sum(axis=1, dtype=np.uint64)

    def insert(self, row: int, keys: np.ndarray) -> None:
        self._keys.insert(row, keys)

    def query(self, keys: np.ndarray) -> np.ndarray:
        """Rows sharing a band key with `keys`, sorted, each once."""
        return self._keys.query(keys)


class NearDuplicateIndex:
    """Keeps the texts it has accepted; `add` answers whether a new text is a near-duplicate of one of them.

    LSH bands (datasketch's choice of bands and rows for the threshold) propose candidates; a candidate counts only
    if the estimated Jaccard similarity (the share of equal MinHash values) reaches the threshold, which removes
    most LSH false positives without a Python loop over them: the accepted texts' signatures are rows of one
    matrix, compared with the query's in a single numpy operation. Memory per text: its signature (4 bytes per
    permutation) and its band keys (16 to 20 bytes per band).
    """

    def __init__(self, threshold: float, shingle_size: int, num_perm: int = NUM_PERM) -> None:
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.shingle_size = shingle_size
        self.num_perm = num_perm
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)  # only for its bands x rows, chosen for the threshold
        self._bands = BandIndex(lsh.b, lsh.r)
        self._keys: list[str] = []  # row -> key
        self._rows: dict[str, int] = {}
        # MinHash values are below 2**32 (datasketch masks them), so uint32 holds them exactly at half the memory.
        self._signatures = np.empty((1024, num_perm), dtype=np.uint32)

    def signature(self, text: str):
        """`text`'s MinHash over this index's shingles (compute once, then ask `similar` and `insert` with it)."""
        return minhash(text, self.shingle_size, self.num_perm)

    def similar(self, signature, min_jaccard: float) -> list[str]:
        """Keys of accepted texts LSH proposes for `signature` whose estimated Jaccard similarity is at least `min_jaccard`, oldest first."""
        return [self._keys[row] for row in self._similar_rows(signature, min_jaccard)]

    def _similar_rows(self, signature, min_jaccard: float) -> np.ndarray:
        rows = self._bands.query(self._bands.keys(signature.hashvalues))
        equal = np.count_nonzero(self._signatures[rows] == signature.hashvalues.astype(np.uint32), axis=1)
        return rows[equal / self.num_perm >= min_jaccard]

    def add(self, key: str, text: str) -> bool:
        """Accept `text` under `key` unless it near-duplicates an accepted text; True if accepted."""
        signature = self.signature(text)
        if key in self._rows or len(self._similar_rows(signature, self.threshold)):
            return False
        self.insert(key, signature)
        return True

    def insert(self, key: str, signature) -> None:
        """Index `signature` under `key` unconditionally (`add` after its check, or a caller that decided itself)."""
        row = len(self._keys)
        if row == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        self._signatures[row] = signature.hashvalues
        self._bands.insert(row, self._bands.keys(signature.hashvalues))
        self._keys.append(key)
        self._rows[key] = row
