"""Every compared model answers every test question with the same greedy settings.

Compared models: the native base model, each fine-tuned variant (the finetune stage's `finetuned_model`), and
any `evaluate.extra_models`. Answers are saved per model as they finish, so an interrupted evaluate
stage resumes with the models still missing. A variant whose model directory does not exist (its
stage did not run) is reported as missing, never silently left out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa

from unifit.config import ConfigError, ModelConfig, UnifitConfig
from unifit.llm.base import ChatClient, Conversation, FreeTextModel, GenerationParams, as_client
from unifit.records import read_parquet, write_parquet
from unifit.stage import StageContext

NATIVE = "native"
ANSWER_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("model", pa.string()),
    ("answer", pa.string()),
    ("finish_reason", pa.string()),
])


def compared_models(ctx: StageContext) -> tuple[dict[str, ModelConfig], list[str]]:
    """Name -> model for every model to compare, and the names of variants whose fine-tuned model is missing.

    A fine-tuned directory is loaded as a hub-style local dir with the base model's dtype, length and
    template settings, since fine-tuning does not change how the model is served.
    """
    cfg = ctx.cfg
    models: dict[str, ModelConfig] = {NATIVE: cfg.model}
    missing: list[str] = []
    for variant in cfg.variants:
        model_dir = ctx.optional_input("finetuned_model", variant=variant.name)
        if model_dir is None:
            missing.append(variant.name)
            continue
        models[variant.name] = dataclasses.replace(cfg.model, name=variant.name, source="hub", path=str(model_dir), random_init={})
    for extra in cfg.evaluate.extra_models:
        if extra.name in models or extra.name in missing:
            raise ConfigError(f"config field `evaluate.extra_models`: name {extra.name!r} is already used "
                              f"(native model or a variant); give each compared model a distinct name")
        models[extra.name] = extra
    return models, missing


def answer_params(cfg: UnifitConfig) -> GenerationParams:
    """Greedy with a repetition penalty (as NEFTune's evaluation), identical for every model."""
    return GenerationParams(max_new_tokens=cfg.evaluate.answer_max_new_tokens, temperature=0.0, top_p=1.0,
                            repetition_penalty=cfg.evaluate.answer_repetition_penalty, seed=cfg.seed)


def collect_answers(questions: Sequence[dict[str, Any]], answerers: Mapping[str, ChatClient | FreeTextModel],
                    params: GenerationParams, path: Path) -> dict[str, list[str]]:
    """Model name -> answers aligned with `questions`; models already complete in `path` are not asked again
    (their clients never load a model)."""
    ids = [q["question_id"] for q in questions]
    rows = read_parquet(path) if path.exists() else []
    done: dict[str, dict[str, str]] = {}
    for row in rows:
        done.setdefault(row["model"], {})[row["question_id"]] = row["answer"]
    rows = [r for r in rows if r["model"] in answerers and set(ids) <= set(done[r["model"]])]  # drop partial/foreign models
    conversations: list[Conversation] = [[{"role": "user", "content": q["question"]}] for q in questions]
    for name, answerer in answerers.items():
        if name in done and set(ids) <= set(done[name]):
            continue
        completions = as_client(answerer).complete(conversations, params)
        if len(completions) != len(questions):
            raise RuntimeError(f"model {name!r}: got {len(completions)} answers for {len(questions)} questions")
        rows += [{"question_id": qid, "model": name, "answer": c.text, "finish_reason": c.finish_reason}
                 for qid, c in zip(ids, completions)]
        write_parquet(rows, path, ANSWER_SCHEMA)  # after each model: the unit of resume
        done[name] = {qid: c.text for qid, c in zip(ids, completions)}
    return {name: [done[name][qid] for qid in ids] for name in answerers}
