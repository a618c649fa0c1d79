"""The evaluate stage: test questions → answers of every compared model → judge win rates → diversity → IFEval.

Outputs in `<run_dir>/evaluate/`: test_questions.parquet, answers.parquet, judge.json, diversity.json,
ifeval_answers.parquet, ifeval.json, and per user test set `test_sets/<name>/{answers.parquet,judge.json}`.
Each is reused when present, so an interrupted stage resumes after its last finished step (the
pipeline keeps the directory only while the stage's fingerprint is unchanged).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from unifit.concept_tree import Node, Tree
from unifit.config import BackendConfig, ModelConfig, UnifitConfig
from unifit.evaluation import ifeval
from unifit.evaluation.answers import answer_params, collect_answers, compared_models
from unifit.evaluation.diversity import DIMENSIONS, diversity
from unifit.evaluation.judge import win_rates
from unifit.evaluation.questions import QUESTION_SCHEMA, generate_test_questions, training_index
from unifit.evaluation.test_sets import load_test_set
from unifit.llm.base import ChatClient, FreeTextModel, GenerationParams, as_client
from unifit.llm.client import served_name
from unifit.pipeline import output_path
from unifit.records import parquet_files, read_column, read_parquet, user_turns, write_parquet
from unifit.stage import StageContext, UserError, read_json, write_json

log = logging.getLogger(__name__)


def judge_setup(cfg: UnifitConfig) -> tuple[ModelConfig, BackendConfig, Optional[str]]:
    """The judge model and backend, and why its verdicts are only a smoke test (None for a real judge).

    A judge that is the base model itself, or a small local model, cannot rate answers meaningfully;
    the report says so instead of presenting its numbers as results.
    """
    model = cfg.judge or cfg.model
    backend = cfg.judge_backend or cfg.backend
    caveat = None
    if model == cfg.model and served_name(model, backend) in (model.name, model.path):
        caveat = f"the judge is the judged base model itself ({model.name}); its verdicts are only a smoke test"
    elif backend.name == "hf" and model.source in ("embedded", "random"):
        caveat = f"the judge is a small local model ({model.name}, {model.source}); its verdicts are only a smoke test"
    return model, backend, caveat


def answer_backend(cfg: UnifitConfig) -> BackendConfig:
    """How the compared models answer: `evaluate.answer_backend`, else the run's backend unless that is an
    OpenAI-compatible endpoint, which serves its own model, never this run's base or fine-tuned weights (hf then)."""
    if cfg.evaluate.answer_backend is not None:
        return cfg.evaluate.answer_backend
    if cfg.backend.name == "openai":
        return BackendConfig(name="hf", cache=cfg.backend.cache)
    return cfg.backend


def load_leaves(ctx: StageContext, instance_files: list[Path]) -> list[Node]:
    """Leaves of generate/tree.json; for imported data (no tree) the instances' distinct concept paths."""
    tree_path = ctx.optional_input("tree")
    if tree_path is not None:
        return Tree.from_json(read_json(tree_path)).leaves()
    paths = {tuple(path) for file in instance_files for path in read_column([file], "concept_path") if path}
    if not paths:
        raise UserError(f"{output_path(ctx.run_dir, 'tree')} is missing and the training instances carry no concept_path: there is nothing to "
                        f"ask test questions about; run the generate stage (stages=[generate,...])")
    return [Node(path[-1], list(path), None) for path in sorted(paths)]


def _questions_asked(instance_files: list[Path]) -> tuple[list[str], list[str]]:
    """Every user turn of the training instances (test questions must not near-duplicate one) and each instance's
    first question (the diversity judge's sample), without reading the answers into Python."""
    texts: list[str] = []
    first: list[str] = []
    previous_row = -1
    for row, text in user_turns(instance_files):
        texts.append(text)
        if row != previous_row:
            first.append(text)
            previous_row = row
    return texts, first


def _test_questions(ctx: StageContext, judge: ChatClient, instance_files: list[Path]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    cfg = ctx.cfg
    path = ctx.out_dir / "test_questions.parquet"
    if path.exists():
        return read_parquet(path), {}
    index = training_index(_questions_asked(instance_files)[0], cfg.generate.dedup_threshold, cfg.generate.dedup_shingle_words)
    _, backend, _ = judge_setup(cfg)
    params = GenerationParams.from_backend(backend, cfg.seed, max_new_tokens=cfg.evaluate.question_max_new_tokens)
    rows, counts = generate_test_questions(
        judge, load_leaves(ctx, instance_files), index, n=cfg.evaluate.num_test_questions, domain=cfg.domain,
        prompt=cfg.evaluate.question_prompt, params=params, seed=cfg.seed, max_rounds=cfg.evaluate.question_max_rounds)
    if len(rows) < cfg.evaluate.num_test_questions:
        log.warning("only %d of %d test questions after %d rounds (%s); raise evaluate.question_max_rounds for more",
                    len(rows), cfg.evaluate.num_test_questions, counts["rounds"], counts)
    if not rows:
        raise UserError(f"no usable test question after {counts['rounds']} rounds ({counts}); the judge/generator "
                        f"model's replies did not parse or all near-duplicated training data")
    write_parquet(rows, path, QUESTION_SCHEMA)
    return rows, counts


def _judge(cfg: UnifitConfig, path: Path, questions: list[dict[str, Any]], answers: dict[str, list[str]], judge: ChatClient,
           missing: list[str], caveat: Optional[str]) -> dict[str, Any]:
    """judge.json for one question set: win rates, or why they were skipped; reused when present."""
    if path.exists():
        return read_json(path)
    if len(answers) < 2:
        judged = {"skipped": f"only {list(answers)} could be compared (missing fine-tuned models: {missing}); win rates need two"}
    else:
        _, judge_backend, _ = judge_setup(cfg)
        params = GenerationParams.from_backend(judge_backend, cfg.seed, max_new_tokens=cfg.evaluate.judge_max_new_tokens,
                                               temperature=0.0, top_p=1.0)
        result = win_rates([q["question"] for q in questions], answers, judge, seed=cfg.seed,
                           max_retries=cfg.evaluate.judge_max_retries, bootstrap_samples=cfg.evaluate.bootstrap_samples,
                           params=params, prompt=cfg.evaluate.judge_prompt, retry_prompt=cfg.evaluate.judge_retry_prompt,
                           question_ids=[q["question_id"] for q in questions])
        judged = {**result.to_dict(), "missing_models": missing, "smoke_test_caveat": caveat}
    write_json(path, judged)
    return judged


def _win_metrics(prefix: str, judged: dict[str, Any]) -> dict[str, Any]:
    if "win_rate" not in judged:
        return {}
    metrics: dict[str, Any] = {f"{prefix}win_rate/{m}": r for m, r in judged["win_rate"].items()}
    metrics.update({f"{prefix}lc_win_rate/{m}": r for m, r in judged.get("length_controlled_win_rate", {}).items()})
    metrics.update({f"{prefix}no_majority_rate": judged["no_majority_rate"], f"{prefix}flip_rate": judged["flip_rate"],
                    f"{prefix}judge_parse_failures": judged["parse_failures"]})
    if judged.get("decisiveness") is not None:
        metrics[f"{prefix}judge_decisiveness"] = judged["decisiveness"]
    return metrics


def _ifeval(cfg: UnifitConfig, out: Path, clients: Mapping[str, ChatClient]) -> dict[str, Any]:
    """ifeval.json: Google's four accuracies per compared model on the first `evaluate.ifeval_prompts` prompts."""
    path = out / "ifeval.json"
    if path.exists():
        return read_json(path)
    rows = ifeval.load_prompts(cfg.evaluate.ifeval_prompts)
    prompts = [{"question_id": str(row["key"]), "question": row["prompt"]} for row in rows]
    params = dataclasses.replace(answer_params(cfg), max_new_tokens=cfg.evaluate.ifeval_max_new_tokens)
    answers = collect_answers(prompts, clients, params, out / "ifeval_answers.parquet")
    result = {"n_prompts": len(rows), "max_new_tokens": params.max_new_tokens,
              "models": {name: ifeval.score(rows, texts) for name, texts in answers.items()}}
    write_json(path, result)
    return result


def run(ctx: StageContext, judge: Optional[ChatClient | FreeTextModel] = None,
        answerers: Optional[Mapping[str, ChatClient | FreeTextModel]] = None) -> dict[str, Any]:
    """Evaluate every compared model. `judge` and `answerers` (compared-model name -> model) replace the configured
    clients (tests, notebooks); models not given are connected from the config, one client per model, its weights
    loaded once per actor for all of its calls (a judge that is also a compared model shares that model's actors)."""
    cfg = ctx.cfg
    out = ctx.out_dir
    judge_model, judge_backend, caveat = judge_setup(cfg)
    judge_client = as_client(judge) if judge is not None else ctx.connect(judge_model, judge_backend, f"judge {served_name(judge_model, judge_backend)}")
    instance_files = parquet_files(ctx.input("instances"))
    test_sets = [load_test_set(p) for p in cfg.evaluate.test_sets]  # bad files fail here, before any model runs

    # every model is connected before the first call: the stage's pools are sized together and never evict each other
    models, missing = compared_models(ctx)
    given = dict(answerers or {})
    backend = answer_backend(cfg)
    clients = {name: as_client(given[name]) if name in given else ctx.connect(model, backend, f"answers {model.name}")
               for name, model in models.items()}

    questions, question_counts = _test_questions(ctx, judge_client, instance_files)
    metrics: dict[str, Any] = {"test_questions": len(questions), **{f"questions_{k}": v for k, v in question_counts.items()}}
    ctx.log_metrics(metrics)

    answers = collect_answers(questions, clients, answer_params(cfg), out / "answers.parquet")
    metrics.update(compared_models=len(models), missing_models=len(missing))
    metrics.update(_win_metrics("", _judge(cfg, out / "judge.json", questions, answers, judge_client, missing, caveat)))
    ctx.log_metrics(metrics)

    for name, rows in test_sets:
        folder = out / "test_sets" / name
        folder.mkdir(parents=True, exist_ok=True)
        set_answers = collect_answers(rows, clients, answer_params(cfg), folder / "answers.parquet")
        metrics.update(_win_metrics(f"{name}/", _judge(cfg, folder / "judge.json", rows, set_answers, judge_client, missing, caveat)))
        ctx.log_metrics(metrics)

    diversity_path = out / "diversity.json"
    if diversity_path.exists():
        scored = read_json(diversity_path)
    else:
        sources = {"unifit": _questions_asked(instance_files)[1]}
        self_instruct = ctx.optional_input("self_instruct")
        if self_instruct is not None:
            sources["self_instruct"] = _questions_asked(parquet_files(self_instruct))[1]
        params = GenerationParams.from_backend(judge_backend, cfg.seed, max_new_tokens=cfg.evaluate.diversity_max_new_tokens,
                                               temperature=0.0, top_p=1.0, json_mode=judge_backend.name != "hf")
        scored = diversity(judge_client, sources, domain=cfg.domain, draws=cfg.evaluate.diversity_draws,
                           sample_size=cfg.evaluate.diversity_sample_size, seed=cfg.seed,
                           max_retries=cfg.evaluate.judge_max_retries, params=params, prompt=cfg.evaluate.diversity_prompt,
                           retry_prompt=cfg.evaluate.diversity_retry_prompt, choice_prompt=cfg.evaluate.diversity_choice_prompt)
        scored["smoke_test_caveat"] = caveat
        write_json(diversity_path, scored)
    for name, entry in scored["sources"].items():
        metrics[f"diversity_failures/{name}"] = entry["failures"]
        if "mean" in entry:
            metrics[f"diversity/{name}"] = sum(entry["mean"][d] for d in DIMENSIONS) / len(DIMENSIONS)
    ctx.log_metrics(metrics)

    if cfg.evaluate.ifeval_prompts:
        for name, result in _ifeval(cfg, out, clients)["models"].items():
            metrics.update({f"ifeval/{name}/{level}": result[level] for level in ifeval.LEVELS if result[level] is not None})
    return metrics
