"""The stand-in server's free text is as varied as real data where the pipeline's cost depends on it."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SHARED_DATA, compose_config
from standin_server import StandinScript

from unifit.dedup import shingles
from unifit.generation.parsing import clean_item, parse_list

PAIRS = 20_000


def share_of_alike_pairs(texts: list[str], min_jaccard: float) -> float:
    """The share of random pairs whose word sets have a Jaccard similarity of at least `min_jaccard`."""
    sets = [shingles(text, 1) for text in texts]
    rng = random.Random(0)
    alike = 0
    for _ in range(PAIRS):
        a, b = rng.sample(sets, 2)
        alike += len(a & b) >= min_jaccard * len(a | b)
    return alike / PAIRS


@pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"{SHARED_DATA} (the shared real data) is not beside this checkout")
def test_self_instruct_tasks_are_no_more_alike_than_real_instructions() -> None:
    """The Self-Instruct novelty filter's candidates are the kept tasks that share several tokens with a new one, so a
    stand-in whose tasks resemble each other more than real ones (more pairs at word-set Jaccard 0.3 and up) makes
    that filter look slower than it is. Real instructions: the 3,111 Alpaca rows in shared/data (kept by
    Self-Instruct's own ROUGE-L filter)."""
    real = [row["instruction"] for row in json.loads((SHARED_DATA / "alpaca_cherry_5pct.json").read_text())]
    script = StandinScript()
    ask = compose_config(["+experiment=cyber_500k"]).generate.self_instruct.prompt  # what the pipeline sends
    prompt = [{"role": "user", "content": ask.format(domain="cybersecurity", examples="1. Explain how a firewall works.", n=8)}]
    tasks: list[str] = []
    for seed in range(len(real) // 8 + 1):
        reply, _ = script.reply(prompt, seed, 4096, False)
        tasks += parse_list(reply, clean_item)  # as run_self_instruct reads the reply
    assert len(set(tasks)) > 0.99 * len(tasks)
    real_share, standin_share = share_of_alike_pairs(real, 0.3), share_of_alike_pairs(tasks[: len(real)], 0.3)
    assert 0.001 < real_share < 0.01  # the reference itself: ~0.4% of real pairs
    assert real_share / 2 < standin_share < 2 * real_share, (standin_share, real_share)
