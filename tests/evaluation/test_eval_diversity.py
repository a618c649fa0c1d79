"""Diversity scoring: reply parsing, per-draw scores, mean/std over draws, retries and failures."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from eval_scripted import ScriptedJudge

from unifit.evaluation.diversity import DIMENSIONS, diversity, draw_samples, parse_scores

FULL = {"scope": 7, "complexity": 5, "practicality": 8, "depth": 6, "clarity": 9, "correlation": 4}


@pytest.mark.parametrize("text", [
    json.dumps(FULL),
    "Here you go:\n```json\n" + json.dumps({k.capitalize(): v for k, v in FULL.items()}) + "\n```",
    "\n".join(f"{k}: {v}" for k, v in FULL.items()),
    "\n".join(f"- **{k.capitalize()}**: {v}/10" for k, v in FULL.items()),
    "\n".join(f"{k} = {v}" for k, v in FULL.items()),
])
def test_parse_scores_accepts_json_and_lines(text: str) -> None:
    assert parse_scores(text) == {k: float(v) for k, v in FULL.items()}


@pytest.mark.parametrize("text", [
    json.dumps({k: v for k, v in FULL.items() if k != "depth"}),  # a dimension missing
    json.dumps({**FULL, "clarity": 11}),  # out of range
    json.dumps({**FULL, "scope": "high"}),
    "scope: 7, the rest are fine",
    "",
])
def test_parse_scores_rejects_incomplete_or_out_of_range(text: str) -> None:
    assert parse_scores(text) is None


def _instructions(prompt: str) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", prompt, re.MULTILINE)


def _scores_for(prompt: str) -> dict[str, int]:
    """Deterministic scores that depend on the draw: scope = number of distinct topics shown."""
    items = _instructions(prompt)
    topics = {item.split()[1] for item in items}
    return {"scope": len(topics), "complexity": 2 if "SI" in items[0] else 6, "practicality": 5, "depth": 4,
            "clarity": 8, "correlation": 3 + len(items)}


def test_diversity_means_and_spread_over_draws() -> None:
    unifit = [f"UNIFIT topic{i % 5} question {i}" for i in range(30)]
    self_instruct = [f"SI topic{i % 2} task {i}" for i in range(30)]
    judge = ScriptedJudge(lambda conv: json.dumps(_scores_for(conv[0]["content"])))
    result = diversity(judge, {"unifit": unifit, "self_instruct": self_instruct}, domain="cybersecurity", draws=4,
                       sample_size=3, seed=0)
    assert len(judge.conversations) == 8
    for name, texts in (("unifit", unifit), ("self_instruct", self_instruct)):
        prompts = [c[0]["content"] for c in judge.conversations if _instructions(c[0]["content"])[0] in texts]
        assert len(prompts) == 4 and all(len(_instructions(p)) == 3 for p in prompts)
        expected = np.array([[_scores_for(p)[d] for d in DIMENSIONS] for p in prompts], dtype=float)
        entry = result["sources"][name]
        assert entry["failures"] == 0 and entry["n_instructions"] == 30
        assert [entry["mean"][d] for d in DIMENSIONS] == pytest.approx(expected.mean(axis=0).tolist())
        assert [entry["std"][d] for d in DIMENSIONS] == pytest.approx(expected.std(axis=0).tolist())
    assert result["sources"]["self_instruct"]["mean"]["scope"] <= 2
    assert result["sources"]["unifit"]["mean"]["correlation"] == 6.0


def test_diversity_failures_are_counted_after_retries() -> None:
    def policy(conv: list[dict[str, str]]) -> str:
        if "SI" in conv[0]["content"]:
            return "These are nice instructions."  # never parses
        return json.dumps(FULL) if len(conv) > 1 else "scope: high"  # parses on the retry

    judge = ScriptedJudge(policy)
    result = diversity(judge, {"unifit": ["UNIFIT a b"] * 5, "self_instruct": ["SI a b"] * 5, "empty": []},
                       domain="dns", draws=3, sample_size=2, seed=1, max_retries=2)
    assert result["sources"]["unifit"]["failures"] == 0 and result["sources"]["unifit"]["mean"]["scope"] == 7.0
    assert result["sources"]["unifit"]["std"]["scope"] == 0.0
    assert result["sources"]["self_instruct"]["failures"] == 3 and "mean" not in result["sources"]["self_instruct"]
    assert result["sources"]["self_instruct"]["failed_replies"] == ["These are nice instructions."] * 3
    assert result["sources"]["empty"] == {"n_instructions": 0, "draws": [], "failures": 0, "failed_replies": []}
    assert result["retries"] == 3 + 3 * 2  # unifit: one retry per draw; self_instruct: two per draw


def test_draw_samples_are_seeded_distinct_subsets() -> None:
    texts = [str(i) for i in range(10)]
    draws = draw_samples(texts, 5, 4, seed=3)
    assert draws == draw_samples(texts, 5, 4, seed=3)
    assert all(len(set(d)) == 4 for d in draws)
    assert draw_samples(texts[:2], 2, 4, seed=0)[0] in (["0", "1"], ["1", "0"])


def test_probability_judge_scores_every_draw_by_its_expected_score() -> None:
    """Known probabilities over "1".."10" per dimension: each draw's score is the expectation, and no draw fails."""
    from unifit.llm.choice import choice_from_logprobs

    logits = {d: [-0.5 * (s - (3 + i)) ** 2 for s in range(1, 11)] for i, d in enumerate(DIMENSIONS)}

    class Chooser:
        name = "chooser"

        def choose(self, conversations, options):
            assert list(options) == [str(i) for i in range(1, 11)]
            return [choice_from_logprobs(logits[next(d for d in DIMENSIONS if f" on {d} (" in c[0]["content"])]) for c in conversations]

    result = diversity(Chooser(), {"a": [f"instruction {i}" for i in range(10)], "b": []}, domain="email", draws=3, sample_size=4, seed=0)
    assert result["method"] == "probability"
    expected = {}
    for d in DIMENSIONS:
        p = np.exp(np.array(logits[d]) - max(logits[d]))
        expected[d] = float((np.arange(1, 11) * p).sum() / p.sum())
    entry = result["sources"]["a"]
    assert entry["failures"] == 0 and len(entry["draws"]) == 3
    assert entry["mean"] == pytest.approx(expected) and entry["std"] == pytest.approx({d: 0.0 for d in DIMENSIONS})
    assert result["sources"]["b"] == {"n_instructions": 0, "draws": [], "failures": 0, "failed_replies": []}
