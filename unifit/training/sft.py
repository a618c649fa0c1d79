"""Supervised fine-tuning with Ray Train + DeepSpeed: setup on the driver, `train_loop` in every worker.

Driver (`run_sft`): tokenize with the chat template (assistant-only labels), pack or shuffle, hand rows to
the workers as a Ray Data dataset, size the DeepSpeed config, run `TorchTrainer`, return the metrics.
Worker (`train_loop`): everything it needs arrives in `train_loop_config` (no module globals); it loads the
model, wraps it with `deepspeed.initialize` (ZeRO-2/3, optional offload, bf16 on GPU, torch AdamW, cosine
schedule with warm-up), resumes from `ray.train.get_checkpoint()` if there is one, trains, checkpoints
every `train.checkpoint_every` steps, and exports the final model (rank 0) as a Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from unifit.config import ConfigError, DeepSpeedConfig, ModelConfig, TrainConfig, UnifitConfig, accumulation_steps, to_container

log = logging.getLogger(__name__)

STATE_FILE = "unifit_state.json"  # inside each checkpoint: the optimizer step it was taken at
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside each Ray checkpoint
RUN_NAME = "sft"  # Ray Train run name: checkpoints land in <storage>/sft/step-XXXXXXXX/
METRICS_FILE = "metrics.json"  # beside the exported model: written last, so its presence means "done"
WORKER_PHASES = ("setup_seconds", "load_seconds", "init_seconds", "data_start_seconds", "export_seconds")  # timed in train_loop besides loop_seconds


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


def plan_steps(train: TrainConfig, rows: int, workers: int) -> dict[str, int]:
    """Micro-batches per epoch per worker and total optimizer steps (Ray splits rows equally, dropping < workers)."""
    if rows < workers:
        raise ConfigError(f"config field `cluster.train_workers`: {workers} workers but only {rows} training rows; "
                          "use fewer workers or more data")
    micro_per_epoch = math.ceil((rows // workers) / train.micro_batch_size)
    accumulation = accumulation_steps(train, workers)
    total = train.max_steps if train.max_steps > 0 else max(1, math.ceil(train.epochs * micro_per_epoch / accumulation))
    return {"micro_per_epoch": micro_per_epoch, "accumulation": accumulation, "total_steps": total}


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


def run_sft(cfg: UnifitConfig, instances: list[dict[str, Any]], out_dir: Path, *, neftune_alpha: float,
            model_cfg: Optional[ModelConfig] = None,
            on_step: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """Fine-tune `model_cfg` (default `cfg.model`) on `instances`; the model lands in `out_dir/model/`.

    Resumes from the newest checkpoint under `out_dir/ray/` (a worker restart within the run, or a rerun
    of an interrupted one). `on_step(step, rank)` runs in every worker after each optimizer step (it is
    pickled to the workers; used to inject failures in tests). Returns train_seconds (wall time of the
    Ray Train run: worker start, load, train, export), loop_seconds, steps, final_loss, tokens (non-pad
    tokens trained on, all workers), tokens_per_second, and the data counts.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from unifit.models import load_tokenizer, resolve_model_dir
    from unifit.raycluster import cpus_per_train_worker, ensure_ray
    from unifit.stage import read_json, write_json
    from unifit.training.data import encode_instances, pack_examples, shuffled

    model_cfg = model_cfg or cfg.model
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    packing = cfg.train.packing
    if packing and model_cfg.trust_remote_code:
        log.warning("train.packing is off for %s: its remote modeling code ignores per-segment position ids and masks, "
                    "so packed conversations would attend to each other; training on padded batches", model_cfg.name)
        packing = False
    tokenizer = load_tokenizer(model_cfg, cfg.cache_dir)
    examples, encode_report = encode_instances(tokenizer, instances, model_cfg.max_length)
    if not examples:
        raise ConfigError(f"no trainable examples among {len(instances)} instances "
                          f"({encode_report.dropped_no_answer} had no answer token within model.max_length={model_cfg.max_length})")
    rows = pack_examples(examples, model_cfg.max_length, seed=cfg.train.seed) if packing else shuffled(examples, cfg.train.seed)
    workers = cfg.cluster.train_workers
    plan = plan_steps(cfg.train, len(rows), workers)
    use_gpu = cfg.cluster.use_gpu
    zero_stage = effective_zero_stage(cfg.deepspeed, workers)
    ds_config = deepspeed_config(dataclasses.replace(cfg.deepspeed, zero_stage=zero_stage), cfg.train, workers, bf16=use_gpu)
    storage = out_dir / "ray"
    resume = latest_checkpoint(storage)
    stage_note = "" if zero_stage == cfg.deepspeed.zero_stage else f" (deepspeed.zero_stage={cfg.deepspeed.zero_stage}: nothing to partition on one worker)"
    log.info("SFT %s: %d examples -> %d rows (packing=%s), %d steps, %d workers, ZeRO-%d%s%s",
             model_cfg.name, len(examples), len(rows), packing, plan["total_steps"], workers,
             zero_stage, stage_note, f", resuming from step {resume[1]}" if resume else "")

    loop_config = {
        "model_dir": str(resolve_model_dir(model_cfg, cfg.cache_dir)),
        "model_cfg": to_container(model_cfg),
        "cache_dir": str(cfg.cache_dir),
        "train": {**to_container(cfg.train), "packing": packing},
        "ds_config": ds_config,
        "zero_stage": zero_stage,
        "plan": plan,
        "use_gpu": use_gpu,
        "pad_id": tokenizer.pad_token_id,
        "neftune_alpha": float(neftune_alpha),
        "export_dir": str(out_dir / "model"),
        "loop_metrics_path": str(storage / "loop_metrics.json"),
        "storage": str(storage),
        "wandb": {**to_container(cfg.wandb), "name": f"{cfg.name}-{out_dir.name}", "dir": str(out_dir)},
        "on_step": on_step,
    }
    ensure_ray(cfg.cluster)
    worker_resources = {"CPU": cpus_per_train_worker(cfg.cluster), **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=worker_resources),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={"train": ray.data.from_items(rows)},
    )
    Path(loop_config["loop_metrics_path"]).unlink(missing_ok=True)
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
    metrics = {**read_json(loop_config["loop_metrics_path"]), "train_seconds": train_seconds, "examples": len(examples),
               "rows": len(rows), "packed": int(packing), "truncated": encode_report.truncated, "dropped_no_answer": encode_report.dropped_no_answer}
    in_worker = sum(metrics[key] for key in WORKER_PHASES) + metrics["loop_seconds"]
    log.info("SFT %s: %.1fs = Ray Train start/stop %.1fs + worker setup %.1fs, load %.1fs, DeepSpeed init %.1fs, "
             "first batch %.1fs, %d steps %.1fs, export %.1fs", model_cfg.name, train_seconds, train_seconds - in_worker,
             *(metrics[key] for key in WORKER_PHASES[:4]), metrics["steps"], metrics["loop_seconds"], metrics["export_seconds"])
    write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker. Reads only `config`; see `run_sft` for its keys."""
    phase_start = time.perf_counter()
    phases = dict.fromkeys(WORKER_PHASES, 0.0)  # seconds per phase; the stage log shows where a short run's time goes

    def end_phase(name: str) -> None:
        nonlocal phase_start
        now = time.perf_counter()
        phases[name] = round(now - phase_start, 2)
        phase_start = now

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from unifit.training.attention import attention_for
    from unifit.training.data import collate, model_inputs
    from unifit.training.neftune import NEFTuneHook

    train = TrainConfig(**config["train"])
    plan, use_gpu, zero_stage = config["plan"], config["use_gpu"], config["zero_stage"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(train.seed + rank)
    device = torch.device("cuda", context.get_local_rank()) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # wraps Ray's process group; zero.Init needs it
    attn_implementation, mask_mode = attention_for(train.packing, flash=use_gpu and _flash_attn_available())
    ds_config = config["ds_config"]
    keep_alive = None
    if zero_stage == 3:  # from_pretrained loads straight into partitions (zero.Init) while this object lives
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    end_phase("setup_seconds")
    model_cfg = ModelConfig(**config["model_cfg"])
    model = AutoModelForCausalLM.from_pretrained(
        config["model_dir"], dtype=torch.bfloat16 if use_gpu else torch.float32,
        trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True,
        attn_implementation=attn_implementation,
        # On CPU the weights stay in this process's memory: read them in now. Memory-mapped, the first optimizer step
        # would copy every page on write (SmolLM2-135M: +1.0 s on the first step against +0.3-0.4 s to read the file).
        disable_mmap=not use_gpu,
    )
    model.config.use_cache = False
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    generator = torch.Generator(device=device).manual_seed(train.seed * 1000 + rank)
    neftune = NEFTuneHook(config["neftune_alpha"], generator=generator)
    if config["neftune_alpha"] > 0:
        neftune.attach(model)

    end_phase("load_seconds")
    total_steps = plan["total_steps"]
    warmup = int(round(train.warmup_ratio * total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda optimizer: get_cosine_schedule_with_warmup(optimizer, warmup, total_steps),
    )
    del keep_alive

    step = resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    on_storage = latest_checkpoint(Path(config["storage"]))
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            registered = (Path(directory), int(json.loads((Path(directory) / STATE_FILE).read_text())["step"]))
            source = on_storage if on_storage and on_storage[1] > registered[1] else registered
            engine.load_checkpoint(str(source[0]), tag=DS_TAG)
            step = resumed_from = source[1]
    elif on_storage is not None:
        engine.load_checkpoint(str(on_storage[0]), tag=DS_TAG)
        step = resumed_from = on_storage[1]

    end_phase("init_seconds")
    wandb_run = _wandb_init(config["wandb"], config) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    accumulation = plan["accumulation"]
    skip = step * accumulation  # micro-batches already consumed before the checkpoint
    epoch = skip // plan["micro_per_epoch"]
    skip -= epoch * plan["micro_per_epoch"]
    # this step's loss × label tokens, label tokens, non-pad tokens, positions computed (padding included)
    window = torch.zeros(4, dtype=torch.float64)
    total_tokens, total_positions, final_loss, micro = 0.0, 0.0, float("nan"), 0
    # One worker has no gradients to average: skip DeepSpeed's all-reduce of every gradient (ZeRO-2/3 need theirs)
    alone = context.get_world_size() == 1 and zero_stage < 2
    loop_start = None  # the loop's clock starts at the first batch: Ray Data's pipeline start-up is a phase of its own
    engine.train()
    while step < total_steps:
        for columns in shard.iter_batches(batch_size=train.micro_batch_size, batch_format="numpy"):
            if loop_start is None:
                end_phase("data_start_seconds")
                loop_start = time.perf_counter()
            if skip:
                skip -= 1
                continue
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
            batch = collate(rows, config["pad_id"], packed=train.packing, mask_mode=mask_mode)
            neftune.attention_mask = batch["attention_mask"].to(device)
            neftune.segment_ids = batch["segment_ids"].to(device) if "segment_ids" in batch else None
            loss = engine(**model_inputs(batch, device)).loss
            with engine.no_sync() if alone else contextlib.nullcontext():
                engine.backward(loss)
            engine.step()
            label_tokens = float((batch["labels"][:, 1:] != -100).sum())
            window += torch.tensor([float(loss.detach()) * label_tokens, label_tokens, float(batch["attention_mask"].sum()),
                                    float(batch["attention_mask"].numel())], dtype=torch.float64)
            micro += 1
            if micro % accumulation:
                continue
            step += 1
            dist.all_reduce(window)
            final_loss = float(window[0] / window[1].clamp(min=1))
            total_tokens += float(window[2])
            total_positions += float(window[3])
            if wandb_run is not None:
                wandb_run.log({"train/loss": final_loss, "train/lr": engine.get_lr()[0],
                               "train/tokens": total_tokens}, step=step)
            window.zero_()
            if config["on_step"] is not None:
                config["on_step"](step, rank)
            if step % train.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(engine, step, {"loss": final_loss, "step": step}, Path(config["storage"]))
            if step >= total_steps:
                break
        epoch += 1
    loop_seconds = time.perf_counter() - loop_start if loop_start is not None else 0.0
    phase_start = time.perf_counter()
    _export(engine, zero_stage, rank, config)
    end_phase("export_seconds")
    metrics = {"steps": step, "final_loss": final_loss, "tokens": total_tokens, "positions": total_positions,
               "padding_efficiency": total_tokens / total_positions if total_positions else 0.0, "loop_seconds": loop_seconds,
               "tokens_per_second": total_tokens / loop_seconds if loop_seconds > 0 else 0.0,
               "resumed_from_step": resumed_from, "epochs_seen": epoch, **phases}
    if wandb_run is not None:
        wandb_run.summary.update(metrics)
        wandb_run.finish()
    if rank == 0:  # Ray's Result keeps the metrics of the last *checkpoint* report, so hand these over in a file
        from unifit.stage import write_json

        write_json(config["loop_metrics_path"], metrics)
    ray.train.report(metrics)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _flash_attn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _save_checkpoint(engine: Any, step: int, metrics: dict[str, Any], storage: Path) -> None:
    """Every rank writes its DeepSpeed shard straight into the checkpoint directory on storage, as DeepSpeed expects.

    No node-local staging copy for Ray to upload: that doubled the I/O, and a 7B ZeRO checkpoint (~100 GB) may not
    fit in a node's /tmp, where a worker killed mid-save also left it behind. Once `save_checkpoint` returns, this
    rank's files are on storage: only then is its `rank_<r>.done` marker written (a stale one from an interrupted
    earlier attempt goes first), so `latest_checkpoint` never picks a partial one.
    """
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    name = f"step-{step:08d}"
    directory = storage / RUN_NAME / name
    marker = directory / f"rank_{rank}.done"
    marker.unlink(missing_ok=True)
    engine.save_checkpoint(str(directory), tag=DS_TAG)
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({"step": step, "world_size": context.get_world_size()}))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint(str(directory)), checkpoint_dir_name=name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
    marker.touch()


def _export(engine: Any, zero_stage: int, rank: int, config: dict[str, Any]) -> None:
    """Rank 0 writes the HF directory (safetensors + tokenizer + chat template) atomically."""
    from unifit.models import load_tokenizer

    # ZeRO-3 partitions every parameter: gathering is a collective, so all ranks take part
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
    if rank != 0:
        return
    target = Path(config["export_dir"])
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    engine.module.config.use_cache = True
    engine.module.save_pretrained(tmp, state_dict={k: v.detach().cpu() for k, v in state.items()}, safe_serialization=True)
    load_tokenizer(ModelConfig(**config["model_cfg"]), config["cache_dir"]).save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _wandb_init(settings: dict[str, Any], config: dict[str, Any]) -> Any:
    """Rank 0's W&B run, or None when disabled (per-step loss, lr and tokens go here)."""
    if settings["mode"] == "disabled":
        return None
    import wandb

    return wandb.init(project=settings["project"], entity=settings["entity"], mode=settings["mode"],
                      name=settings["name"], dir=settings["dir"], reinit="finish_previous",
                      config={"train": config["train"], "deepspeed": config["ds_config"], "model": config["model_cfg"],
                              "neftune_alpha": config["neftune_alpha"]})
