"""The scoring-model training set T: K random instances from every leaf of the concept tree.

K comes from a target fraction of all data (K = max(1, round(fraction * N / #leaves))), so T is about
`fraction` of the data while every leaf — even a small one — contributes. Each leaf is drawn with its
own seeded generator and from its instances sorted by id, so the draw depends on neither row order nor
on which other leaves exist.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Sequence

from unifit.fingerprint import fingerprint


def k_per_leaf(n_instances: int, n_leaves: int, fraction: float) -> int:
    return max(1, round(fraction * n_instances / max(1, n_leaves)))


def draw_sample(ids: Sequence[str], leaf_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], dict[str, Any]]:
    """(ids of the sample, leaf by leaf in sorted leaf order; counts) from the instances' id and leaf_id columns.
    Leaves with fewer than K instances give all they have."""
    by_leaf: dict[str, list[str]] = defaultdict(list)
    for id_, leaf in zip(ids, leaf_ids):
        by_leaf[leaf].append(id_)
    k = k_per_leaf(len(ids), len(by_leaf), fraction)
    sample: list[str] = []
    for leaf in sorted(by_leaf):
        members = sorted(by_leaf[leaf])
        rng = random.Random(fingerprint([seed, leaf]))
        sample.extend(rng.sample(members, min(k, len(members))))
    counts = {"instances": len(ids), "leaves": len(by_leaf), "k_per_leaf": k, "sample_size": len(sample),
              "sample_fraction": round(len(sample) / len(ids), 4) if ids else 0.0}
    return sample, counts
