"""Judge win rate: all compared answers go to the judge together, in three orderings, and the majority wins.

Position bias is the known failure of LLM judges, so every question is judged with the answers in
forward, reverse and a seeded random order; a model wins a question only when at least two of the
three verdicts name it. Anything else is "no majority" — reported as its own outcome, never a tie
or a win. The flip rate (verdicts that do not all name the same model) measures the judge's
inconsistency; bootstrap intervals over questions give the uncertainty of each win rate.

A judge with a `choose` method (local hf weights, OpenAI-compatible servers with logprobs) picks the
verdict `[[i]]` by its own probabilities, so it always decides; its position bias (how often each
position wins, per ordering) and decisiveness (mean probability of the chosen verdict) are reported.
A judge without one answers in free text, parsed for `[[i]]` with bounded re-asks. Judges prefer long
answers, so each model's mean answer length and a length-controlled win rate are reported beside it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from unifit.config import EvaluateConfig
from unifit.llm.asking import ask, outcomes
from unifit.llm.base import ChatClient, Choice, Conversation, FreeTextModel, GenerationParams

ORDERING_NAMES: tuple[str, ...] = ("forward", "reverse", "random")
_VERDICT = re.compile(r"\[\[\s*(\d+)\s*\]\]")


@dataclass
class WinRates:
    """The judge's result. Rates are fractions of questions; every question is exactly one of: won by a model, or no majority."""

    models: list[str]
    n_questions: int
    win_rate: dict[str, float]
    no_majority_rate: float
    flip_rate: float
    parse_failures: int  # orderings whose verdict never parsed (after retries); each counts as no vote
    win_rate_ci: dict[str, tuple[float, float]]  # bootstrap 95% percentile interval per model
    no_majority_ci: tuple[float, float]
    retries: int = 0  # re-asks spent on unparseable verdicts
    judge: str = ""
    method: str = "text"  # "probability": verdicts chosen by the judge's probabilities; "text": parsed from free text
    decisiveness: Optional[float] = None  # mean probability of the chosen verdict (probability judges only)
    position_bias: dict[str, list[float]] = field(default_factory=dict)  # ordering -> share of verdicts for each position 1..k
    mean_answer_words: dict[str, float] = field(default_factory=dict)
    verdict_share: dict[str, float] = field(default_factory=dict)  # share of single verdicts (question x ordering) per model, probability-weighted
    length_controlled_win_rate: dict[str, float] = field(default_factory=dict)  # verdict_share at equal answer length (logistic fit)
    records: list[dict[str, Any]] = field(default_factory=list)  # one per question: orderings, verdicts, votes, winner, flip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def orderings(k: int, seed: int, index: int) -> list[list[int]]:
    """Forward, reverse and seeded-random permutations of k answers for question `index` (reproducible per question)."""
    forward = list(range(k))
    shuffled = [int(i) for i in np.random.default_rng([seed, index]).permutation(k)]
    return [forward, forward[::-1], shuffled]


def format_answers(answers: Sequence[str]) -> str:
    """The answers block of the judge prompt: `[Answer 1]` … `[Answer k]` (the verdict contract)."""
    return "\n\n".join(f"[Answer {i}]\n{text.strip()}" for i, text in enumerate(answers, start=1))


def parse_verdict(text: str, k: int) -> Optional[int]:
    """1-based index from `[[i]]`; None when absent, out of range, or when different indices are given (ambiguous)."""
    found = {int(m) for m in _VERDICT.findall(text)}
    if len(found) != 1:
        return None
    (choice,) = found
    return choice if 1 <= choice <= k else None


def majority(votes: Sequence[Optional[str]]) -> Optional[str]:
    """The model named by at least two of the three verdicts, else None (failed orderings are no vote)."""
    counts = Counter(v for v in votes if v is not None)
    best = [name for name, n in counts.items() if n >= 2]
    return best[0] if best else None


def is_flip(votes: Sequence[Optional[str]]) -> bool:
    """True when the parsed verdicts name more than one model (failed orderings are counted in parse_failures instead)."""
    return len({v for v in votes if v is not None}) > 1


def bootstrap_ci(outcomes: np.ndarray, n_labels: int, *, samples: int, seed: int) -> np.ndarray:
    """95% percentile intervals, shape (n_labels, 2), of the fraction of questions with each outcome label.

    `outcomes[q]` is a label in [0, n_labels); questions are resampled with replacement `samples` times.
    """
    n = len(outcomes)
    rng = np.random.default_rng(seed)
    fractions = np.empty((samples, n_labels))
    for start in range(0, samples, 256):  # chunks keep memory at 256 x n
        stop = min(samples, start + 256)
        draws = outcomes[rng.integers(0, n, size=(stop - start, n))]
        for label in range(n_labels):
            fractions[start:stop, label] = (draws == label).mean(axis=1)
    return np.percentile(fractions, [2.5, 97.5], axis=0).T


def aggregate(votes: Sequence[Sequence[Optional[str]]], models: Sequence[str], *, parse_failures: int = 0,
              bootstrap_samples: int = 1000, seed: int = 0) -> WinRates:
    """Win rates from a verdict table: `votes[q]` are the models named by the three orderings of question q (None = no vote)."""
    if not votes:
        raise ValueError("no questions to aggregate")
    models = list(models)
    unknown = {v for row in votes for v in row if v is not None and v not in models}
    if unknown:
        raise ValueError(f"votes name models {sorted(unknown)} that are not among the compared models {models}")
    winners = [majority(row) for row in votes]
    flips = [is_flip(row) for row in votes]
    n = len(votes)
    label = {name: i for i, name in enumerate(models)}
    outcomes = np.array([label[w] if w is not None else len(models) for w in winners])  # last label = no majority
    ci = bootstrap_ci(outcomes, len(models) + 1, samples=bootstrap_samples, seed=seed)
    return WinRates(
        models=models,
        n_questions=n,
        win_rate={m: sum(w == m for w in winners) / n for m in models},
        no_majority_rate=sum(w is None for w in winners) / n,
        flip_rate=sum(flips) / n,
        parse_failures=parse_failures,
        win_rate_ci={m: (float(ci[i, 0]), float(ci[i, 1])) for i, m in enumerate(models)},
        no_majority_ci=(float(ci[-1, 0]), float(ci[-1, 1])),
        records=[{"votes": list(row), "winner": w, "flip": f} for row, w, f in zip(votes, winners, flips)],
    )


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-2, steps: int = 50) -> tuple[float, float]:
    """Intercept and slope of P(y=1) = sigmoid(a + b·x) by Newton's method; y may be soft labels in [0, 1].

    A small L2 penalty keeps both finite when the data are separable (e.g. a model that never wins).
    """
    design = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    n = len(x)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(design @ theta)))
        gradient = design.T @ (p - y) / n + l2 * theta
        hessian = (design.T * (p * (1 - p))) @ design / n + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def length_controlled(shares: np.ndarray, words: np.ndarray) -> dict[str, np.ndarray]:
    """Per-model verdict share and its length-controlled value, in the spirit of AlpacaEval's length control.

    `shares[v, m]`: how much verdict v (one question in one ordering) goes to model m (a probability, or 0/1);
    `words[v, m]`: model m's answer length there. For each model, a logistic regression of its share on
    tanh(length difference to the other models' mean / its std) is fitted; the win probability at equal
    length is the sigmoid of the intercept.
    """
    n_models = shares.shape[1]
    raw = shares.mean(axis=0)
    controlled = np.empty(n_models)
    for m in range(n_models):
        others = np.delete(words, m, axis=1).mean(axis=1)
        diff = words[:, m] - others
        scale = diff.std() or 1.0
        intercept, _ = fit_logistic(np.tanh(diff / scale), shares[:, m])
        controlled[m] = 1 / (1 + np.exp(-intercept))
    return {"share": raw, "controlled": controlled}


def chooses_by_probability(judge: Any) -> bool:
    """Whether `judge` picks among fixed options by its probabilities: a model client knows from its backend
    (`offers_choice`); a scripted model does when it has a `choose` method."""
    return bool(getattr(judge, "offers_choice", callable(getattr(judge, "choose", None))))


def _ask_choices(judge: Any, prompts: Sequence[str], k: int) -> list[Optional[Choice]]:
    conversations: list[Conversation] = [[{"role": "user", "content": p}] for p in prompts]
    choices = list(judge.choose(conversations, [f"[[{i}]]" for i in range(1, k + 1)]))
    if len(choices) != len(prompts):
        raise RuntimeError(f"{getattr(judge, 'name', judge)!r} returned {len(choices)} choices for {len(prompts)} prompts")
    return choices


def win_rates(questions: Sequence[str], answers: Mapping[str, Sequence[str]], judge: ChatClient | FreeTextModel, *, seed: int,
              max_retries: int = 2, bootstrap_samples: int = 1000, params: Optional[GenerationParams] = None,
              prompt: str = EvaluateConfig.judge_prompt, retry_prompt: str = EvaluateConfig.judge_retry_prompt,
              question_ids: Optional[Sequence[str]] = None) -> WinRates:
    """Judge every question with all models' answers in three orderings; see the module docstring.

    `answers` maps model name -> answers aligned with `questions`; `prompt` has {question}, {answers}, {k}.
    A judge with `choose` picks `[[i]]` by probability; otherwise unparseable verdicts are re-asked
    `max_retries` times, then counted in `parse_failures` as no vote.
    """
    models = list(answers)
    if len(models) < 2:
        raise ValueError(f"win rates need at least two models to compare, got {models}")
    for name in models:
        if len(answers[name]) != len(questions):
            raise ValueError(f"model {name!r} has {len(answers[name])} answers for {len(questions)} questions; they must be aligned")
    if not questions:
        raise ValueError("no test questions to judge")
    k = len(models)
    n_orders = len(ORDERING_NAMES)
    params = params or GenerationParams(max_new_tokens=256, temperature=0.0, seed=seed)
    perms = [orderings(k, seed, q) for q in range(len(questions))]
    prompts = [prompt.format(question=question, k=k, answers=format_answers([answers[models[j]][q] for j in order]))
               for q, question in enumerate(questions) for order in perms[q]]
    retries = 0
    probs: list[Optional[tuple[float, ...]]] = [None] * len(prompts)
    if chooses_by_probability(judge):
        method = "probability"
        choices = _ask_choices(judge, prompts, k)
        verdicts: list[Optional[int]] = [None if c is None else c.index + 1 for c in choices]
        probs = [None if c is None else tuple(c.probs) for c in choices]
        replies = ["" if v is None else f"[[{v}]]" for v in verdicts]
    else:
        method = "text"
        verdicts, replies, retries = outcomes(ask(judge, [[{"role": "user", "content": p}] for p in prompts], params,
                                                  lambda text: parse_verdict(text, k), max_retries=max_retries,
                                                  retry_prompt=retry_prompt.format(k=k)))
    votes: list[list[Optional[str]]] = []
    for q in range(len(questions)):
        row = verdicts[n_orders * q:n_orders * q + n_orders]
        votes.append([None if v is None else models[perms[q][o][v - 1]] for o, v in enumerate(row)])
    failures = sum(v is None for v in verdicts)
    result = aggregate(votes, models, parse_failures=failures, bootstrap_samples=bootstrap_samples, seed=seed)
    result.retries = retries
    result.method = method
    result.judge = getattr(judge, "name", type(judge).__name__)
    for q, record in enumerate(result.records):
        record.update(
            question_id=question_ids[q] if question_ids is not None else str(q),
            question=questions[q],
            orderings={name: [models[j] for j in perms[q][o]] for o, name in enumerate(ORDERING_NAMES)},
            verdicts=verdicts[n_orders * q:n_orders * q + n_orders],
            replies=replies[n_orders * q:n_orders * q + n_orders],
            probs=[list(p) if p is not None else None for p in probs[n_orders * q:n_orders * q + n_orders]],
        )
    for o, name in enumerate(ORDERING_NAMES):
        picked = [verdicts[n_orders * q + o] for q in range(len(questions))]
        decided = [v for v in picked if v is not None]
        result.position_bias[name] = [sum(v == i for v in decided) / len(decided) if decided else 0.0 for i in range(1, k + 1)]
    chosen = [p[v - 1] for p, v in zip(probs, verdicts) if p is not None and v is not None]
    result.decisiveness = float(np.mean(chosen)) if chosen else None
    words = {m: [len(a.split()) for a in answers[m]] for m in models}
    result.mean_answer_words = {m: float(np.mean(words[m])) for m in models}
    shares, lengths = [], []
    for i, verdict in enumerate(verdicts):
        if verdict is None:
            continue
        q, o = divmod(i, n_orders)
        order = perms[q][o]  # order[position] = model index
        share = np.zeros(k)
        if probs[i] is not None:
            for position, p in enumerate(probs[i]):
                share[order[position]] += p
        else:
            share[order[verdict - 1]] = 1.0
        shares.append(share)
        lengths.append([words[m][q] for m in models])
    if shares:
        fitted = length_controlled(np.array(shares), np.array(lengths, dtype=float))
        result.verdict_share = {m: float(fitted["share"][j]) for j, m in enumerate(models)}
        result.length_controlled_win_rate = {m: float(fitted["controlled"][j]) for j, m in enumerate(models)}
    return result
