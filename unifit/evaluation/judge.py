"""Judge win rate: all compared answers go to the judge together, in three orderings, and the majority wins.

Position bias is the known failure of LLM judges, so every question is judged with the answers in
forward, reverse and a seeded random order; a model wins a question only when at least two of the
three verdicts name it. Anything else is "no majority" — reported as its own outcome, never a tie
or a win. The flip rate (verdicts that do not all name the same model) measures the judge's
inconsistency; bootstrap intervals over questions give the uncertainty of each win rate.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from unifit.config import EvaluateConfig
from unifit.evaluation.asking import ask_with_retries
from unifit.llm.base import ChatClient, FreeTextModel, GenerationParams

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


def win_rates(questions: Sequence[str], answers: Mapping[str, Sequence[str]], judge: ChatClient | FreeTextModel, *, seed: int,
              max_retries: int = 2, bootstrap_samples: int = 1000, params: Optional[GenerationParams] = None,
              prompt: str = EvaluateConfig.judge_prompt, retry_prompt: str = EvaluateConfig.judge_retry_prompt,
              question_ids: Optional[Sequence[str]] = None) -> WinRates:
    """Judge every question with all models' answers in three orderings; see the module docstring.

    `answers` maps model name -> answers aligned with `questions`; `prompt` has {question}, {answers}, {k}.
    Unparseable verdicts are re-asked `max_retries` times, then counted in `parse_failures` as no vote.
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
    params = params or GenerationParams(max_new_tokens=256, temperature=0.0, seed=seed)
    perms = [orderings(k, seed, q) for q in range(len(questions))]
    prompts = [prompt.format(question=question, k=k, answers=format_answers([answers[models[j]][q] for j in order]))
               for q, question in enumerate(questions) for order in perms[q]]
    verdicts, replies, retries = ask_with_retries(
        judge, prompts, lambda text, _i: parse_verdict(text, k), [retry_prompt.format(k=k)] * len(prompts), params,
        max_retries=max_retries)
    votes: list[list[Optional[str]]] = []
    for q in range(len(questions)):
        row = verdicts[3 * q:3 * q + 3]
        votes.append([None if v is None else models[perms[q][o][v - 1]] for o, v in enumerate(row)])
    failures = sum(v is None for v in verdicts)
    result = aggregate(votes, models, parse_failures=failures, bootstrap_samples=bootstrap_samples, seed=seed)
    result.retries = retries
    result.judge = getattr(judge, "name", type(judge).__name__)
    for q, record in enumerate(result.records):
        record.update(
            question_id=question_ids[q] if question_ids is not None else str(q),
            question=questions[q],
            orderings={name: [models[j] for j in perms[q][o]] for o, name in enumerate(ORDERING_NAMES)},
            verdicts=verdicts[3 * q:3 * q + 3],
            replies=replies[3 * q:3 * q + 3],
        )
    return result
