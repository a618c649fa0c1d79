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
    (their clients never load a model).

    The models still missing answer at once, one thread each: each is served by its own actors, so a call too
    small to fill the cluster (a few questions, one batch) leaves the cores to the other models instead of idle.
    Each model's answers are saved as soon as it finishes (the unit of resume); a model that fails does not
    lose the others' answers.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    ids = [q["question_id"] for q in questions]
    done: dict[str, dict[str, tuple[str, str]]] = {}  # model -> question id -> (answer, finish_reason)
    for row in read_parquet(path) if path.exists() else []:
        done.setdefault(row["model"], {})[row["question_id"]] = (row["answer"], row["finish_reason"])
    done = {name: answers for name, answers in done.items() if name in answerers and set(ids) <= set(answers)}  # drop partial/foreign models
    conversations: list[Conversation] = [[{"role": "user", "content": q["question"]}] for q in questions]
    pending = [name for name in answerers if name not in done]
    if pending:
        with ThreadPoolExecutor(max_workers=len(pending), thread_name_prefix="answers") as executor:
            futures = {executor.submit(as_client(answerers[name]).complete, conversations, params): name for name in pending}
            errors: list[BaseException] = []
            for future in as_completed(futures):
                name = futures[future]
                if future.exception() is not None:
                    errors.append(future.exception())
                    continue
                completions = future.result()
                if len(completions) != len(questions):
                    raise RuntimeError(f"model {name!r}: got {len(completions)} answers for {len(questions)} questions")
                done[name] = {qid: (c.text, c.finish_reason) for qid, c in zip(ids, completions)}
                rows = [{"question_id": qid, "model": model, "answer": done[model][qid][0], "finish_reason": done[model][qid][1]}
                        for model in answerers if model in done for qid in ids]
                write_parquet(rows, path, ANSWER_SCHEMA)
        if errors:
            raise errors[0]
    return {name: [done[name][qid][0] for qid in ids] for name in answerers}
