"""Instruction diversity (Figure 3): the judge rates random draws of instructions on six dimensions.

A draw is a set of instructions shown together, because breadth ("scope") is a property of a set,
not of one instruction. Several seeded draws per source are averaged and their spread (std) kept,
so UNIFIT and Self-Instruct are compared with an honest error bar.

A judge with `choose` (local weights, servers with logprobs) is asked one dimension at a time and its
score is the expected score under its probabilities over "1".."10", so every draw is scored. Otherwise
replies are parsed as a JSON object or `dimension: score` lines; unparseable ones are retried, then
counted as failures.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from unifit.config import EvaluateConfig
from unifit.evaluation.judge import chooses_by_probability
from unifit.llm.asking import ask, outcomes
from unifit.llm.base import ChatClient, FreeTextModel, GenerationParams

DIMENSIONS: tuple[str, ...] = ("scope", "complexity", "practicality", "depth", "clarity", "correlation")
DESCRIPTIONS: dict[str, str] = {
    "scope": "breadth of the topics covered", "complexity": "difficulty of the tasks", "practicality": "usefulness in real work",
    "depth": "expertise needed", "clarity": "how well-posed they are", "correlation": "relevance to the domain",
}
SCORES: tuple[str, ...] = tuple(str(i) for i in range(1, 11))
_LINE = re.compile(r"\b(" + "|".join(DIMENSIONS) + r")\b\W{0,6}?\s*[:=\-]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_JSON = re.compile(r"\{[^{}]*\}", re.DOTALL)


def parse_scores(text: str) -> Optional[dict[str, float]]:
    """All six scores in [1, 10] from a JSON object or `dimension: score` lines; None if any is missing or out of range."""
    scores: dict[str, float] = {}
    for blob in _JSON.findall(text):
        try:
            obj = json.loads(blob)
        except json.JSONDecodeError:
            continue
        lowered = {str(key).strip().lower(): value for key, value in obj.items()}
        if all(d in lowered for d in DIMENSIONS):
            try:
                scores = {d: float(lowered[d]) for d in DIMENSIONS}
            except (TypeError, ValueError):
                continue
            break
    if not scores:
        for name, value in _LINE.findall(text):
            scores.setdefault(name.lower(), float(value))
    if set(scores) != set(DIMENSIONS) or not all(1 <= v <= 10 for v in scores.values()):
        return None
    return {d: scores[d] for d in DIMENSIONS}


def draw_samples(instructions: Sequence[str], draws: int, size: int, seed: int) -> list[list[str]]:
    """`draws` seeded random subsets of `size` distinct instructions (all of them when fewer exist)."""
    rng = np.random.default_rng(seed)
    size = min(size, len(instructions))
    return [[instructions[i] for i in rng.choice(len(instructions), size=size, replace=False)] for _ in range(draws)]


def diversity(judge: ChatClient | FreeTextModel, sources: Mapping[str, Sequence[str]], *, domain: str, draws: int, sample_size: int,
              seed: int, max_retries: int = 2, params: Optional[GenerationParams] = None,
              prompt: str = EvaluateConfig.diversity_prompt,
              retry_prompt: str = EvaluateConfig.diversity_retry_prompt,
              choice_prompt: str = EvaluateConfig.diversity_choice_prompt) -> dict[str, Any]:
    """Per source: mean and std over draws of each dimension, the per-draw scores, and the failed draws.

    `sources` maps a name (e.g. unifit, self_instruct) to its instruction texts; an empty source is
    reported with `n_instructions: 0` and no scores. Failed draws (unparseable after retries) are left
    out of the mean and counted in `failures`.
    """
    params = params or GenerationParams(max_new_tokens=128, temperature=0.0, seed=seed)
    plan: list[tuple[str, list[str]]] = []
    for offset, (name, texts) in enumerate(sources.items()):
        if texts:
            plan += [(name, sample) for sample in draw_samples(list(texts), draws, sample_size, seed + 1000 * offset)]
    listed = [(len(sample), "\n".join(f"{i}. {t.strip()}" for i, t in enumerate(sample, 1))) for _, sample in plan]
    retries = 0
    if chooses_by_probability(judge):
        method = "probability"
        conversations = [[{"role": "user", "content": choice_prompt.format(n=n, domain=domain, instructions=text, dimension=d,
                                                                           description=DESCRIPTIONS[d])}]
                         for n, text in listed for d in DIMENSIONS]
        choices = list(judge.choose(conversations, list(SCORES))) if conversations else []
        parsed: list[Optional[dict[str, float]]] = []
        replies = []
        for start in range(0, len(choices), len(DIMENSIONS)):
            mine = choices[start:start + len(DIMENSIONS)]
            if any(c is None for c in mine):
                parsed.append(None)
                replies.append("no option named by the judge for some dimension")
                continue
            parsed.append({d: float(sum((i + 1) * p for i, p in enumerate(c.probs))) for d, c in zip(DIMENSIONS, mine)})
            replies.append(json.dumps({d: {"expected": parsed[-1][d], "probs": [round(p, 4) for p in c.probs]}
                                       for d, c in zip(DIMENSIONS, mine)}))
    else:
        method = "text"
        prompts = [prompt.format(n=n, domain=domain, instructions=text) for n, text in listed]
        parsed, replies, retries = outcomes(ask(judge, [[{"role": "user", "content": p}] for p in prompts], params, parse_scores,
                                                max_retries=max_retries, retry_prompt=retry_prompt.format()))
    result: dict[str, Any] = {"dimensions": list(DIMENSIONS), "draws": draws, "sample_size": sample_size,
                              "judge": getattr(judge, "name", type(judge).__name__), "retries": retries, "method": method, "sources": {}}
    for name, texts in sources.items():
        mine = [(scores, reply) for (source, _), scores, reply in zip(plan, parsed, replies) if source == name]
        ok = [scores for scores, _ in mine if scores is not None]
        entry: dict[str, Any] = {"n_instructions": len(texts), "draws": ok, "failures": len(mine) - len(ok),
                                 "failed_replies": [reply for scores, reply in mine if scores is None]}
        if ok:
            table = np.array([[s[d] for d in DIMENSIONS] for s in ok])
            entry["mean"] = dict(zip(DIMENSIONS, table.mean(axis=0).tolist()))
            entry["std"] = dict(zip(DIMENSIONS, table.std(axis=0).tolist()))
        result["sources"][name] = entry
    return result
