"""Judge win rates: exact arithmetic on hand-made verdict tables and scripted judges with known outcomes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from eval_scripted import ScriptedJudge, always_garbage, answers_in_prompt, garbage_then_second, picks_first, picks_longest

from unifit.evaluation.judge import aggregate, bootstrap_ci, majority, orderings, parse_verdict, win_rates

QUESTIONS = [f"How does protocol feature {i} affect mail delivery?" for i in range(40)]


def _answers(models: list[str], lengths: dict[str, int], n: int = len(QUESTIONS)) -> dict[str, list[str]]:
    return {m: [f"{m} answer {q}: " + "x" * lengths[m] for q in range(n)] for m in models}


@pytest.mark.parametrize("text,k,expected", [
    ("Answer 2 is clearly better. [[2]]", 3, 2),
    ("[[ 1 ]]", 2, 1),
    ("I pick [[3]] ... final verdict: [[3]]", 3, 3),
    ("[[1]] or maybe [[2]]", 2, None),  # ambiguous
    ("[[4]]", 3, None),  # out of range
    ("[[0]]", 3, None),
    ("The best is Answer 2.", 3, None),
    ("[[A]]", 2, None),
])
def test_parse_verdict(text: str, k: int, expected: int | None) -> None:
    assert parse_verdict(text, k) == expected


def test_orderings_are_forward_reverse_and_seeded_random() -> None:
    fwd, rev, rnd = orderings(4, seed=7, index=3)
    assert fwd == [0, 1, 2, 3] and rev == [3, 2, 1, 0] and sorted(rnd) == [0, 1, 2, 3]
    assert orderings(4, 7, 3) == orderings(4, 7, 3)
    assert len({tuple(orderings(4, 7, q)[2]) for q in range(30)}) > 5  # varies per question


def test_aggregate_exact_arithmetic_on_a_verdict_table() -> None:
    votes = [
        ["A", "A", "B"],  # A by majority, flip
        ["A", "B", "C"],  # no majority, flip
        ["B", "B", "B"],  # B, consistent
        [None, "A", "A"],  # A (a failed ordering is no vote), no flip
        [None, None, "A"],  # one vote is not a majority
        ["C", None, "B"],  # no majority, flip
    ]
    result = aggregate(votes, ["A", "B", "C"], parse_failures=4, bootstrap_samples=2000, seed=1)
    assert result.win_rate == {"A": 2 / 6, "B": 1 / 6, "C": 0.0}
    assert result.no_majority_rate == 3 / 6
    assert math.isclose(sum(result.win_rate.values()) + result.no_majority_rate, 1.0)
    assert result.flip_rate == 3 / 6
    assert result.parse_failures == 4
    assert [r["winner"] for r in result.records] == ["A", None, "B", "A", None, None]
    for model, (lo, hi) in result.win_rate_ci.items():
        assert lo <= result.win_rate[model] <= hi
    assert result.win_rate_ci["C"] == (0.0, 0.0)
    lo, hi = result.no_majority_ci
    assert lo <= 0.5 <= hi and lo < hi


def test_majority_needs_two_of_three() -> None:
    assert majority(["A", "B", "A"]) == "A"
    assert majority(["A", "B", None]) is None
    assert majority([None, None, None]) is None


def test_bootstrap_interval_width_matches_binomial_standard_error() -> None:
    n, p = 400, 0.3
    outcomes = np.array([0] * int(n * p) + [1] * int(n * (1 - p)))
    (lo, hi), _ = bootstrap_ci(outcomes, 2, samples=2000, seed=0)
    expected = 2 * 1.96 * math.sqrt(p * (1 - p) / n)  # ~0.0898
    assert lo <= p <= hi
    assert abs((hi - lo) - expected) < 0.015


def test_first_position_judge_two_models_winner_is_the_random_orderings_first() -> None:
    judge = ScriptedJudge(picks_first)
    result = win_rates(QUESTIONS, _answers(["A", "B"], {"A": 5, "B": 9}), judge, seed=3, bootstrap_samples=200)
    # forward names A, reverse names B, so the random ordering's first answer decides with 2 of 3 votes.
    expected_a = sum(orderings(2, 3, q)[2][0] == 0 for q in range(len(QUESTIONS))) / len(QUESTIONS)
    assert 0 < expected_a < 1  # both outcomes occur: the test can tell a wrong mapping apart
    assert result.win_rate == pytest.approx({"A": expected_a, "B": 1 - expected_a})
    assert result.no_majority_rate == 0.0
    assert result.flip_rate == 1.0  # forward and reverse always disagree
    assert result.parse_failures == 0 and result.retries == 0
    assert len(judge.conversations) == 3 * len(QUESTIONS)


def test_first_position_judge_three_models_has_no_majority_unless_random_matches() -> None:
    judge = ScriptedJudge(picks_first)
    result = win_rates(QUESTIONS, _answers(["A", "B", "C"], {"A": 5, "B": 9, "C": 2}), judge, seed=5, bootstrap_samples=200)
    firsts = [orderings(3, 5, q)[2][0] for q in range(len(QUESTIONS))]
    n = len(QUESTIONS)
    # forward -> A, reverse -> C; the random ordering adds a second vote for A or C, or names B (no majority).
    assert result.win_rate == pytest.approx({"A": firsts.count(0) / n, "B": 0.0, "C": firsts.count(2) / n})
    assert result.no_majority_rate == pytest.approx(firsts.count(1) / n)
    assert firsts.count(1) > 0
    assert result.flip_rate == 1.0
    for record, first in zip(result.records, firsts):
        assert record["winner"] == (None if first == 1 else "ABC"[first])


def test_longest_answer_judge_makes_the_longest_model_win_everything() -> None:
    judge = ScriptedJudge(picks_longest)
    answers = _answers(["native", "pithy_ne", "all"], {"native": 3, "pithy_ne": 40, "all": 12})
    result = win_rates(QUESTIONS, answers, judge, seed=0, bootstrap_samples=200)
    assert result.win_rate == {"native": 0.0, "pithy_ne": 1.0, "all": 0.0}
    assert result.no_majority_rate == 0.0 and result.flip_rate == 0.0
    assert result.win_rate_ci["pithy_ne"] == (1.0, 1.0)
    # every prompt shows all three answers, and the three orderings of a question differ
    first = [answers_in_prompt(c[0]["content"]) for c in judge.conversations[:3]]
    assert all(len(shown) == 3 for shown in first)
    assert first[0] == first[1][::-1]


def test_garbage_then_verdict_is_retried_and_counted_as_retries() -> None:
    judge = ScriptedJudge(garbage_then_second)
    result = win_rates(QUESTIONS, _answers(["A", "B", "C"], {"A": 1, "B": 2, "C": 3}), judge, seed=2, max_retries=1,
                       bootstrap_samples=200)
    n = len(QUESTIONS)
    assert result.parse_failures == 0 and result.retries == 3 * n
    # position 2 is B in forward (A,B,C) and reverse (C,B,A): B wins every question by majority.
    assert result.win_rate["B"] == 1.0
    retry = judge.conversations[3 * n]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"] and "[[i]]" in retry[2]["content"]
    assert judge.params[1].seed == judge.params[0].seed + 1  # retries ask for a fresh reply


@pytest.mark.parametrize("policy,retries", [(always_garbage, 2), (garbage_then_second, 0)])
def test_unparseable_verdicts_are_counted_and_give_no_majority(policy, retries: int) -> None:
    judge = ScriptedJudge(policy)
    result = win_rates(QUESTIONS[:10], _answers(["A", "B"], {"A": 1, "B": 2}, n=10), judge, seed=0, max_retries=retries,
                       bootstrap_samples=100)
    assert result.parse_failures == 30
    assert result.no_majority_rate == 1.0 and result.win_rate == {"A": 0.0, "B": 0.0}
    assert result.flip_rate == 0.0
    assert len(judge.conversations) == 30 * (retries + 1)
    assert all(r["verdicts"] == [None, None, None] for r in result.records)


def test_misaligned_answers_are_rejected() -> None:
    with pytest.raises(ValueError, match="aligned"):
        win_rates(QUESTIONS, {"A": ["a"], "B": ["b"] * len(QUESTIONS)}, ScriptedJudge(picks_first), seed=0)
    with pytest.raises(ValueError, match="two models"):
        win_rates(QUESTIONS, {"A": ["a"] * len(QUESTIONS)}, ScriptedJudge(picks_first), seed=0)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_probability_judge_maps_every_ordering_back_to_the_models(k: int) -> None:
    """Known logits per displayed position (model strength + position bonus): each ordering's verdict, its
    probabilities, the majority, position bias and decisiveness follow exactly."""
    from eval_scripted import ScriptedLogitJudge

    models = [f"m{j}" for j in range(k)]
    answers = _answers(models, {m: 10 + j for j, m in enumerate(models)}, n=12)
    strength = {m: 0.6 * j for j, m in enumerate(models)}  # the last model is best
    bonus = [1.0] + [0.0] * (k - 1)  # the judge favours the first position
    judge = ScriptedLogitJudge(strength, bonus, model_of=lambda text: text.split()[0])
    result = win_rates(QUESTIONS[:12], answers, judge, seed=3, bootstrap_samples=200)
    assert result.method == "probability" and result.parse_failures == 0 and result.retries == 0
    assert len(judge.calls) == 12 * 3
    chosen_probs = []
    for q, record in enumerate(result.records):
        for o, name in enumerate(("forward", "reverse", "random")):
            shown = record["orderings"][name]
            assert shown == [models[j] for j in orderings(k, 3, q)[o]]
            logits = np.array([strength[m] + bonus[i] for i, m in enumerate(shown)])
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            assert record["probs"][o] == pytest.approx(list(probs))
            assert record["verdicts"][o] == int(np.argmax(probs)) + 1
            assert record["votes"][o] == shown[int(np.argmax(probs))]
            chosen_probs.append(probs.max())
        assert record["winner"] == majority(record["votes"])
    assert result.decisiveness == pytest.approx(float(np.mean(chosen_probs)))
    for name in ("forward", "reverse", "random"):
        verdicts = [r["verdicts"][("forward", "reverse", "random").index(name)] for r in result.records]
        assert result.position_bias[name] == pytest.approx([verdicts.count(i) / 12 for i in range(1, k + 1)])
    assert sum(result.win_rate.values()) + result.no_majority_rate == pytest.approx(1.0)
    assert result.mean_answer_words == {m: pytest.approx(4.0) for m in models}  # "<model> answer <q>: xxx…" is 4 words


def test_logistic_fit_recovers_known_coefficients() -> None:
    from unifit.evaluation.judge import fit_logistic

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=20000)
    y = (rng.uniform(size=x.size) < 1 / (1 + np.exp(-(-0.4 + 2.0 * x)))).astype(float)
    a, b = fit_logistic(x, y, l2=1e-6)
    assert a == pytest.approx(-0.4, abs=0.05) and b == pytest.approx(2.0, abs=0.1)


def test_length_controlled_win_rate_removes_a_pure_length_preference() -> None:
    """A judge that only prefers longer answers: the long model wins raw, but at equal length it is a coin flip."""
    rng = np.random.default_rng(1)
    n = 60
    words = {"short": rng.integers(20, 120, size=n), "long": rng.integers(20, 120, size=n) + 40}
    answers = {m: [" ".join(["w"] * int(words[m][q])) for q in range(n)] for m in words}

    class LengthJudge:
        name = "length-lover"

        def choose(self, conversations, options):
            from unifit.llm.choice import choice_from_logprobs

            out = []
            for conversation in conversations:
                lengths = [len(a.split()) for a in answers_in_prompt(conversation[0]["content"])]
                out.append(choice_from_logprobs([0.03 * n_words for n_words in lengths]))
            return out

    result = win_rates([f"q{i}" for i in range(n)], answers, LengthJudge(), seed=0, bootstrap_samples=100)
    assert result.win_rate["long"] > 0.8
    assert result.verdict_share["long"] > 0.7
    assert result.length_controlled_win_rate["long"] == pytest.approx(0.5, abs=0.12)
    assert result.length_controlled_win_rate["short"] == pytest.approx(0.5, abs=0.12)
