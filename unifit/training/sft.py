"""Supervised fine-tuning with Ray Train + DeepSpeed: setup on the driver, the `SFTRecipe` in every worker.

Driver (`run_sft`): have Ray Data build the training rows from the instances' parquet files (tokenised with the chat
template, assistant-only labels, shuffled, packed: `unifit.training.rows`), stream them to the workers, size the
DeepSpeed config, run `TorchTrainer`, return the metrics.
Worker (`train_loop` → `SFTRecipe`): everything it needs arrives in one frozen `LoopConfig` (no module globals);
it loads the model, wraps it with `deepspeed.initialize` (ZeRO-2/3, optional offload, bf16 on GPU, torch AdamW,
cosine schedule with warm-up), resumes from the newest checkpoint if there is one, trains, checkpoints every
`train.checkpoint_every` steps, and exports the final model (rank 0) as a Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from unifit.atomic import atomic_dir
from unifit.config import ConfigError, DeepSpeedConfig, ModelConfig, TrainConfig, UnifitConfig, WandbConfig, accumulation_steps, to_container

log = logging.getLogger(__name__)

STATE_FILE = "unifit_state.json"  # inside each checkpoint: the optimizer step it was taken at
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside each Ray checkpoint
RUN_NAME = "sft"  # Ray Train run name: checkpoints land in <storage>/sft/step-XXXXXXXX/
METRICS_FILE = "metrics.json"  # beside the exported model: written last, so its presence means "done"
WORKER_PHASES = ("setup_seconds", "load_seconds", "init_seconds", "data_start_seconds", "export_seconds")  # timed by SFTRecipe besides loop_seconds


class TrainingFailed(RuntimeError):
    """Training stopped for good (restarts exhausted); the message says where the last checkpoint is."""


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, workers: int, *, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config.

    The optimizer is torch's AdamW (`torch_adam`: no DeepSpeed ops to compile) in its fused form, which runs on CPU
    and GPU alike and is the Hugging Face `Trainer`'s default: on CPU a 135M model's step takes 0.07 s instead of
    0.34 s, and the first step (optimizer-state allocation) 0.3 s instead of 2 s.
    """
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(train, workers),
        "train_batch_size": train.global_batch_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload with torch AdamW instead of the compiled CPUAdam
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": train.weight_decay, "torch_adam": True, "fused": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def effective_zero_stage(ds: DeepSpeedConfig, workers: int) -> int:
    """The ZeRO stage to run. ZeRO partitions training state over data-parallel ranks: with one worker and nothing
    offloaded there is nothing to partition, and stages 1-3 only add gradient bucketing and copies (on CPU, a
    135M model's step takes ~4 s under ZeRO-2 against ~2.7 s under stage 0), so a single worker runs stage 0."""
    if workers == 1 and not (ds.offload_optimizer or ds.offload_params):
        return 0
    return ds.zero_stage


@dataclass(frozen=True)
class StepPlan:
    micro_per_epoch: int  # micro-batches per epoch per worker
    accumulation: int  # micro-batches per optimizer step
    total_steps: int  # optimizer steps of the whole run


def plan_steps(train: TrainConfig, rows: int, workers: int) -> StepPlan:
    """Micro-batches per epoch per worker and total optimizer steps (Ray splits rows equally, dropping < workers)."""
    if rows < workers:
        raise ConfigError(f"config field `cluster.train_workers`: {workers} workers but only {rows} training rows; "
                          "use fewer workers or more data")
    micro_per_epoch = math.ceil((rows // workers) / train.micro_batch_size)
    accumulation = accumulation_steps(train, workers)
    total = train.max_steps if train.max_steps > 0 else max(1, math.ceil(train.epochs * micro_per_epoch / accumulation))
    return StepPlan(micro_per_epoch=micro_per_epoch, accumulation=accumulation, total_steps=total)


@dataclass(frozen=True)
class LoopConfig:
    """Everything a Ray Train worker needs, decided once on the driver (`run_sft`); the workers read nothing else."""

    model_dir: str  # the base model as a safetensors directory
    model: ModelConfig  # how it loads (remote code), and its tokenizer, exported beside the weights
    cache_dir: str
    train: TrainConfig  # with `packing` as it runs (off for models with their own modeling code)
    ds_config: dict[str, Any]
    zero_stage: int  # the stage that runs (`effective_zero_stage`)
    plan: StepPlan
    use_gpu: bool
    pad_id: int
    neftune_alpha: float  # 0 = no NEFTune
    export_dir: str  # the Hugging Face directory written at the end
    storage: str  # Ray Train's storage: checkpoints, and the loop metrics handed to the driver
    wandb: WandbConfig
    wandb_name: str
    wandb_dir: str
    on_step: Optional[Callable[[int, int], None]] = None  # (step, rank) after each optimizer step; tests inject failures

    @property
    def loop_metrics_path(self) -> Path:
        return Path(self.storage) / "loop_metrics.json"


def model_complete(out_dir: Path) -> bool:
    return (out_dir / "model" / "config.json").exists() and (out_dir / METRICS_FILE).exists()


def latest_checkpoint(storage: Path) -> Optional[tuple[Path, int]]:
    """Newest checkpoint under `storage` that every rank finished writing, with its step.

    Ray registers a reported checkpoint asynchronously: a worker killed right after reporting can leave a
    complete checkpoint on storage that `ray.train.get_checkpoint()` does not know yet, so workers and the
    driver also look here. Ray copies a checkpoint into storage file by file, so each rank marks its part
    complete (`rank_<r>.done`) only after the upload has returned; a kill mid-copy leaves no marker.
    """
    best: Optional[tuple[Path, int]] = None
    for state_file in storage.glob(f"**/{STATE_FILE}"):
        state = json.loads(state_file.read_text())
        done = all((state_file.parent / f"rank_{rank}.done").exists() for rank in range(int(state["world_size"])))
        if done and (best is None or int(state["step"]) > best[1]):
            best = (state_file.parent, int(state["step"]))
    return best


def run_sft(cfg: UnifitConfig, instances: str | Path | Sequence[str | Path], out_dir: Path, *, neftune_alpha: float,
            model_cfg: Optional[ModelConfig] = None, rows_dir: Optional[Path] = None,
            on_step: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """Fine-tune `model_cfg` (default `cfg.model`) on `instances` (a parquet file, a directory of them, or a list
    of files); the model lands in `out_dir/model/`.

    The training rows are built by Ray Data into `rows_dir` (default `out_dir/rows/`; runs on the same data may share
    one) and streamed from there (`unifit.training.rows`).
    Resumes from the newest checkpoint under `out_dir/ray/` (a worker restart within the run, or a rerun
    of an interrupted one). `on_step(step, rank)` runs in every worker after each optimizer step (it is
    pickled to the workers; used to inject failures in tests). Returns train_seconds (wall time of the
    Ray Train run: worker start, load, train, export), rows_seconds (building the rows), loop_seconds, steps,
    final_loss, tokens (non-pad tokens trained on, all workers), tokens_per_second, and the data counts.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from unifit.models import load_tokenizer, resolve_model_dir
    from unifit.raycluster import cpus_per_train_worker, ensure_ray
    from unifit.stage import read_json, write_json
    from unifit.training.rows import ROWS_DIR, build_rows, stream_rows

    model_cfg = model_cfg or cfg.model
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    packing = cfg.train.packing
    if packing and model_cfg.trust_remote_code:
        log.warning("train.packing is off for %s: its remote modeling code ignores per-segment position ids and masks, "
                    "so packed conversations would attend to each other; training on padded batches", model_cfg.name)
        packing = False
    tokenizer = load_tokenizer(model_cfg, cfg.cache_dir)
    ensure_ray(cfg.cluster)
    rows_start = time.perf_counter()
    rows = build_rows(instances, Path(rows_dir) if rows_dir else out_dir / ROWS_DIR, model_cfg=model_cfg, cache_dir=str(cfg.cache_dir), packing=packing, seed=cfg.train.seed)
    rows_seconds = time.perf_counter() - rows_start
    if not rows.examples:
        raise ConfigError(f"no trainable examples among {rows.instances} instances "
                          f"({rows.dropped_no_answer} had no answer token within model.max_length={model_cfg.max_length})")
    workers = cfg.cluster.train_workers
    plan = plan_steps(cfg.train, rows.rows, workers)
    use_gpu = cfg.cluster.use_gpu
    zero_stage = effective_zero_stage(cfg.deepspeed, workers)
    ds_config = deepspeed_config(dataclasses.replace(cfg.deepspeed, zero_stage=zero_stage), cfg.train, workers, bf16=use_gpu)
    storage = out_dir / "ray"
    resume = latest_checkpoint(storage)
    stage_note = "" if zero_stage == cfg.deepspeed.zero_stage else f" (deepspeed.zero_stage={cfg.deepspeed.zero_stage}: nothing to partition on one worker)"
    log.info("SFT %s: %d examples -> %d rows (packing=%s), %d steps, %d workers, ZeRO-%d%s%s",
             model_cfg.name, rows.examples, rows.rows, packing, plan.total_steps, workers,
             zero_stage, stage_note, f", resuming from step {resume[1]}" if resume else "")

    loop_config = LoopConfig(
        model_dir=str(resolve_model_dir(model_cfg, cfg.cache_dir)), model=model_cfg, cache_dir=str(cfg.cache_dir),
        train=dataclasses.replace(cfg.train, packing=packing), ds_config=ds_config, zero_stage=zero_stage, plan=plan,
        use_gpu=use_gpu, pad_id=tokenizer.pad_token_id, neftune_alpha=float(neftune_alpha), export_dir=str(out_dir / "model"),
        storage=str(storage), wandb=cfg.wandb, wandb_name=f"{cfg.name}-{out_dir.name}", wandb_dir=str(out_dir), on_step=on_step,
    )
    worker_resources = {"CPU": cpus_per_train_worker(cfg.cluster), **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        functools.partial(train_loop, loop_config),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=worker_resources),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={"train": stream_rows(rows, packing)},
        # Every run reads the rows in file order, so a resumed run skips exactly the micro-batches trained on before
        dataset_config=DataConfig(execution_options=_ordered()),
    )
    loop_config.loop_metrics_path.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as error:
        last = latest_checkpoint(storage)
        where = f"{last[0]} (step {last[1]})" if last else "none was written"
        raise TrainingFailed(
            f"training {model_cfg.name} failed after train.max_failures={cfg.train.max_failures} restart(s): {_first_line(error)}. "
            f"Last checkpoint: {where}; rerunning the stage resumes from it.") from error
    train_seconds = time.perf_counter() - start
    metrics = {**read_json(loop_config.loop_metrics_path), "train_seconds": train_seconds, "rows_seconds": rows_seconds,
               "examples": rows.examples, "rows": rows.rows, "packed": int(packing), "truncated": rows.truncated,
               "dropped_no_answer": rows.dropped_no_answer}
    in_worker = sum(metrics[key] for key in WORKER_PHASES) + metrics["loop_seconds"]
    log.info("SFT %s: %.1fs = Ray Train start/stop %.1fs + worker setup %.1fs, load %.1fs, DeepSpeed init %.1fs, "
             "first batch %.1fs, %d steps %.1fs, export %.1fs", model_cfg.name, train_seconds, train_seconds - in_worker,
             *(metrics[key] for key in WORKER_PHASES[:4]), metrics["steps"], metrics["loop_seconds"], metrics["export_seconds"])
    write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def train_loop(config: LoopConfig) -> None:
    """One Ray Train worker: the recipe's steps in order."""
    recipe = SFTRecipe(config)
    recipe.setup()
    recipe.train()
    recipe.export()
    recipe.cleanup()


class SFTRecipe:
    """Fine-tuning inside one Ray Train worker, in the shape of torchtune's single-device recipe: `setup` (model,
    NEFTune, DeepSpeed engine, the resume state, W&B), `train` (optimizer steps over `_micro_batches`, checkpointing
    with `save_checkpoint`), `export` (rank 0's Hugging Face directory) and `cleanup` (metrics to the driver, W&B).

    Each phase's seconds land in `phases`: the stage log shows where a short run's time goes.
    """

    def __init__(self, config: LoopConfig) -> None:
        self.config = config
        self.phases = dict.fromkeys(WORKER_PHASES, 0.0)
        self._phase_start = time.perf_counter()  # setup_seconds counts the heavy imports too
        self.step = 0  # optimizer steps done, the resumed ones included
        self.resumed_from = 0
        self.epoch = 0  # passes over this worker's shard begun, the resumed ones included
        self.final_loss = float("nan")
        self.tokens = 0.0  # non-pad tokens trained on, all workers
        self.positions = 0.0  # positions computed, padding included, all workers
        self.loop_seconds = 0.0
        self._loop_start: Optional[float] = None

    def _end_phase(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self._phase_start, 2)
        self._phase_start = now

    def setup(self) -> None:
        import deepspeed
        import ray.train
        import torch

        from unifit.training.attention import attention_for

        config = self.config
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        torch.manual_seed(config.train.seed + self.rank)
        self.device = torch.device("cuda", context.get_local_rank()) if config.use_gpu else torch.device("cpu")
        if config.use_gpu:
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend="nccl" if config.use_gpu else "gloo")  # wraps Ray's process group; zero.Init needs it
        attn_implementation, self.mask_mode = attention_for(config.train.packing, flash=config.use_gpu and _flash_attn_available())
        keep_alive = None
        if config.zero_stage == 3:  # from_pretrained loads straight into partitions (zero.Init) while this object lives
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(config.ds_config)
        self._end_phase("setup_seconds")
        model = self._load_model(attn_implementation)
        self._end_phase("load_seconds")
        self.engine = self._setup_engine(model)
        del keep_alive
        self.step = self.resumed_from = self._restore()
        self._end_phase("init_seconds")
        self.wandb_run = self._setup_wandb() if self.rank == 0 else None

    def _load_model(self, attn_implementation: str) -> Any:
        """The base model, with gradient checkpointing and the NEFTune hook as configured."""
        import torch
        from transformers import AutoModelForCausalLM

        from unifit.training.neftune import NEFTuneHook

        config = self.config
        model = AutoModelForCausalLM.from_pretrained(
            config.model_dir, dtype=torch.bfloat16 if config.use_gpu else torch.float32,
            trust_remote_code=config.model.trust_remote_code, use_safetensors=True,
            attn_implementation=attn_implementation,
            # On CPU the weights stay in this process's memory: read them in now. Memory-mapped, the first optimizer step
            # would copy every page on write (SmolLM2-135M: +1.0 s on the first step against +0.3-0.4 s to read the file).
            disable_mmap=not config.use_gpu,
        )
        model.config.use_cache = False
        if config.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        generator = torch.Generator(device=self.device).manual_seed(config.train.seed * 1000 + self.rank)
        self.neftune = NEFTuneHook(config.neftune_alpha, generator=generator)
        if config.neftune_alpha > 0:
            self.neftune.attach(model)
        return model

    def _setup_engine(self, model: Any) -> Any:
        """The DeepSpeed engine: ZeRO as configured, torch AdamW, cosine schedule with warm-up."""
        import deepspeed
        from transformers import get_cosine_schedule_with_warmup

        total_steps = self.config.plan.total_steps
        warmup = int(round(self.config.train.warmup_ratio * total_steps))
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=self.config.ds_config,
            lr_scheduler=lambda optimizer: get_cosine_schedule_with_warmup(optimizer, warmup, total_steps),
        )
        return engine

    def _restore(self) -> int:
        """Load the newest complete checkpoint into the engine and return its step (0 without one): the one Ray
        registered, or a newer one on storage that a kill kept Ray from registering (`latest_checkpoint`)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        on_storage = latest_checkpoint(Path(self.config.storage))
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                registered = (Path(directory), int(json.loads((Path(directory) / STATE_FILE).read_text())["step"]))
                source = on_storage if on_storage and on_storage[1] > registered[1] else registered
                self.engine.load_checkpoint(str(source[0]), tag=DS_TAG)
                return source[1]
        if on_storage is not None:
            self.engine.load_checkpoint(str(on_storage[0]), tag=DS_TAG)
            return on_storage[1]
        return 0

    def _setup_wandb(self) -> Any:
        """Rank 0's W&B run, or None when disabled (per-step loss, lr and tokens go here)."""
        config = self.config
        if config.wandb.mode == "disabled":
            return None
        import wandb

        return wandb.init(project=config.wandb.project, entity=config.wandb.entity, mode=config.wandb.mode,
                          name=config.wandb_name, dir=config.wandb_dir, reinit="finish_previous",
                          config={"train": to_container(config.train), "deepspeed": config.ds_config,
                                  "model": to_container(config.model), "neftune_alpha": config.neftune_alpha})

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """This worker's micro-batches, collated, pass after pass over its shard until the last step; after a resume
        the micro-batches consumed before the checkpoint are skipped. The loop's clock starts at the first batch:
        Ray Data's pipeline start-up is a phase of its own."""
        import ray.train

        from unifit.training.data import collate

        plan, train = self.config.plan, self.config.train
        shard = ray.train.get_dataset_shard("train")
        skip = self.step * plan.accumulation
        self.epoch = skip // plan.micro_per_epoch
        skip -= self.epoch * plan.micro_per_epoch
        while self.step < plan.total_steps:
            self.epoch += 1
            for columns in shard.iter_batches(batch_size=train.micro_batch_size, batch_format="numpy"):
                if self._loop_start is None:
                    self._end_phase("data_start_seconds")
                    self._loop_start = time.perf_counter()
                if skip:
                    skip -= 1
                    continue
                rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
                yield collate(rows, self.config.pad_id, packed=train.packing, mask_mode=self.mask_mode)

    def train(self) -> None:
        """Optimizer steps up to the plan's total; loss and token counts are reduced over all workers at each step."""
        import torch
        import torch.distributed as dist

        from unifit.training.data import model_inputs

        config, engine, device = self.config, self.engine, self.device
        # this step's loss × label tokens, label tokens, non-pad tokens, positions computed (padding included)
        window = torch.zeros(4, dtype=torch.float64)
        micro = 0
        # One worker has no gradients to average: skip DeepSpeed's all-reduce of every gradient (ZeRO-2/3 need theirs)
        alone = self.world_size == 1 and config.zero_stage < 2
        engine.train()
        for batch in self._micro_batches():
            self.neftune.attention_mask = batch["attention_mask"].to(device)
            self.neftune.segment_ids = batch["segment_ids"].to(device) if "segment_ids" in batch else None
            loss = engine(**model_inputs(batch, device)).loss
            with engine.no_sync() if alone else contextlib.nullcontext():
                engine.backward(loss)
            engine.step()
            label_tokens = float((batch["labels"][:, 1:] != -100).sum())
            window += torch.tensor([float(loss.detach()) * label_tokens, label_tokens, float(batch["attention_mask"].sum()),
                                    float(batch["attention_mask"].numel())], dtype=torch.float64)
            micro += 1
            if micro % config.plan.accumulation:
                continue
            self.step += 1
            dist.all_reduce(window)
            self.final_loss = float(window[0] / window[1].clamp(min=1))
            self.tokens += float(window[2])
            self.positions += float(window[3])
            if self.wandb_run is not None:
                self.wandb_run.log({"train/loss": self.final_loss, "train/lr": engine.get_lr()[0],
                                    "train/tokens": self.tokens}, step=self.step)
            window.zero_()
            if config.on_step is not None:
                config.on_step(self.step, self.rank)
            if self.step % config.train.checkpoint_every == 0 and self.step < config.plan.total_steps:
                self.save_checkpoint()
            if self.step >= config.plan.total_steps:
                break
        self.loop_seconds = time.perf_counter() - self._loop_start if self._loop_start is not None else 0.0

    def save_checkpoint(self) -> None:
        """Every rank writes its DeepSpeed shard straight into the checkpoint directory on storage, as DeepSpeed expects.

        No node-local staging copy for Ray to upload: that doubled the I/O, and a 7B ZeRO checkpoint (~100 GB) may not
        fit in a node's /tmp, where a worker killed mid-save also left it behind. Once `save_checkpoint` returns, this
        rank's files are on storage: only then is its `rank_<r>.done` marker written (a stale one from an interrupted
        earlier attempt goes first), so `latest_checkpoint` never picks a partial one.
        """
        import ray.train

        name = f"step-{self.step:08d}"
        directory = Path(self.config.storage) / RUN_NAME / name
        marker = directory / f"rank_{self.rank}.done"
        marker.unlink(missing_ok=True)
        self.engine.save_checkpoint(str(directory), tag=DS_TAG)
        if self.rank == 0:
            (directory / STATE_FILE).write_text(json.dumps({"step": self.step, "world_size": self.world_size}))
        ray.train.report({"loss": self.final_loss, "step": self.step}, checkpoint=ray.train.Checkpoint(str(directory)),
                         checkpoint_dir_name=name, checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        marker.touch()

    def export(self) -> None:
        """Rank 0 writes the HF directory (safetensors + tokenizer + chat template) atomically."""
        from unifit.models import load_tokenizer

        self._phase_start = time.perf_counter()
        engine = self.engine
        # ZeRO-3 partitions every parameter: gathering is a collective, so all ranks take part
        state = engine._zero3_consolidated_16bit_state_dict() if self.config.zero_stage == 3 else engine.module.state_dict()
        if self.rank == 0:
            engine.module.config.use_cache = True
            with atomic_dir(self.config.export_dir) as tmp:
                engine.module.save_pretrained(tmp, state_dict={k: v.detach().cpu() for k, v in state.items()}, safe_serialization=True)
                load_tokenizer(self.config.model, self.config.cache_dir).save_pretrained(tmp)
        self._end_phase("export_seconds")

    def cleanup(self) -> None:
        """Report the run's metrics: to W&B (rank 0), to the driver in a file (Ray's Result keeps the metrics of the
        last *checkpoint* report) and to Ray Train."""
        import ray.train

        metrics = {"steps": self.step, "final_loss": self.final_loss, "tokens": self.tokens, "positions": self.positions,
                   "padding_efficiency": self.tokens / self.positions if self.positions else 0.0,
                   "loop_seconds": self.loop_seconds,
                   "tokens_per_second": self.tokens / self.loop_seconds if self.loop_seconds > 0 else 0.0,
                   "resumed_from_step": self.resumed_from, "epochs_seen": self.epoch, **self.phases}
        if self.wandb_run is not None:
            self.wandb_run.summary.update(metrics)
            self.wandb_run.finish()
        if self.rank == 0:
            from unifit.stage import write_json

            write_json(self.config.loop_metrics_path, metrics)
        ray.train.report(metrics)


def _ordered() -> Any:
    """Ray Data execution options that keep the rows in file order (Ray Train's default lets blocks overtake)."""
    from ray.data import ExecutionOptions

    options = ExecutionOptions()
    options.preserve_order = True
    return options


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _flash_attn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None
