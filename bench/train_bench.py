"""Training throughput: non-pad tokens/s on the same variable-length conversations.

CPU (default): three runs, one epoch each over identical data with the same micro-batches, one worker on both cores
(--repeats N alternates N rounds of them and keeps each one's fastest):
  1. UNIFIT SFT (Ray Train + DeepSpeed ZeRO-2), packed rows        -> packed vs padded (goal >= 1.5x)
  2. UNIFIT SFT (Ray Train + DeepSpeed ZeRO-2), padded micro-batches
  3. a plain Hugging Face `Trainer`, padded micro-batches          -> 2 vs 3: Ray/DeepSpeed overhead (goal >= 1.0x)
Every run trains in a fresh process (UNIFIT's in its Ray Train worker, the `Trainer` in a spawned one), as a user's
run would, so both pay the same cold start (first-touch page faults, optimizer state allocation).

    python bench/train_bench.py                      # tiny random Llama (conf/model/tiny_random.yaml), < 4 min on 2 cores
    python bench/train_bench.py --model smollm2_135m  # the embedded 135M model (slower)

GPU (no Ray: the lent GPU machine has no Ray wheel): one process, a 7B-architecture model with random weights
in bf16 (no download), DeepSpeed ZeRO-2 with the same DeepSpeed config (or `--engine torch`: plain AdamW), the
workers' collation, packing and NEFTune hook, activation checkpointing; prints tokens/s and
MFU = 6 * N * tokens/s / peak bf16 FLOP/s.

    python bench/train_bench.py --device cuda --arch llama7b [--engine torch] [--peak-tflops 989] [--offload-optimizer]
    python bench/train_bench.py --device cpu --arch tiny --engine torch --steps 1   # the same path on a CPU, toy size
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # unifit without an install: the lent GPU machine, and the spawned `Trainer` process
WORDS = ("dns resolver record zone mail server certificate chain route prefix cache edge origin key signature "
         "protocol packet header policy domain query answer trust anchor relay filter").split()


def conversations(count: int, seed: int) -> list[dict[str, Any]]:
    """Variable-length single-turn chats (answers 10-300 words, long-tailed): where padding wastes most."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
        answer_words = int(10 * (30 ** rng.random()))  # log-uniform 10..300
        answer = " ".join(rng.choice(WORDS) for _ in range(answer_words))
        rows.append({"id": str(index), "messages": [{"role": "user", "content": f"{index}: {question}?"},
                                                    {"role": "assistant", "content": answer}]})
    return rows


def model_config(name: str) -> Any:
    import yaml

    from unifit.config import ModelConfig

    return ModelConfig(**yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()))


def run_unifit(model_cfg: Any, instances: Path, args: argparse.Namespace, packing: bool, out: Path) -> dict[str, Any]:
    from unifit.config import ClusterConfig, DeepSpeedConfig, TrainConfig, UnifitConfig, WandbConfig
    from unifit.training.sft import run_sft

    cfg = UnifitConfig(
        model=model_cfg, deepspeed=DeepSpeedConfig(zero_stage=2), wandb=WandbConfig(mode="disabled"),
        cluster=ClusterConfig(train_workers=1, num_cpus=args.threads, cpus_per_actor=args.threads, object_store_memory_gb=1),
        train=TrainConfig(epochs=1.0, global_batch_size=args.batch, micro_batch_size=args.batch,
                          learning_rate=1e-4, warmup_ratio=0.0, packing=packing, checkpoint_every=10**6, max_failures=0),
    )
    metrics = run_sft(cfg, instances, out, neftune_alpha=0.0)
    return {"tokens_per_second": metrics["tokens_per_second"], "tokens": metrics["tokens"], "positions": metrics["positions"],
            "loop_seconds": metrics["loop_seconds"], "train_seconds": metrics["train_seconds"], "rows": metrics["rows"]}


def run_hf_trainer_fresh(model_cfg: Any, padded_run: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """`run_hf_trainer` in a newly spawned process: the same cold start the Ray Train worker has."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_hf_trainer, model_cfg, padded_run, args, out).result()


def run_hf_trainer(model_cfg: Any, padded_run: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The baseline: HF `Trainer` on the rows UNIFIT's padded run trained on (same tokenization, batch size, data and
    order; one epoch, padded)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from unifit.models import load_model, load_tokenizer
    from unifit.records import read_parquet
    from unifit.training.data import collate
    from unifit.training.rows import ROWS_DIR

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(model_cfg, model_cfg_cache())
    rows = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in read_parquet(padded_run / ROWS_DIR)]
    counted = {"tokens": 0, "positions": 0}

    def collator(batch: list[dict[str, Any]]) -> dict[str, Any]:
        collated = collate(batch, tokenizer.pad_token_id, packed=False)
        counted["tokens"] += int(collated["attention_mask"].sum())
        counted["positions"] += collated["attention_mask"].numel()
        return {"input_ids": collated["input_ids"], "attention_mask": collated["attention_mask"], "labels": collated["labels"]}

    model = load_model(model_cfg, model_cfg_cache())
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, num_train_epochs=1, learning_rate=1e-4,
        lr_scheduler_type="cosine", optim="adamw_torch_fused", report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0, data_seed=0, disable_tqdm=True,
        train_sampling_strategy="sequential",  # the same micro-batches, in the same order, as UNIFIT's padded run
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens_per_second": counted["tokens"] / seconds, "tokens": counted["tokens"], "positions": counted["positions"],
            "loop_seconds": seconds}


def model_cfg_cache() -> str:
    from unifit.config import UnifitConfig

    return UnifitConfig().cache_dir


def cpu_bench(args: argparse.Namespace) -> None:
    from unifit.config import ClusterConfig
    from unifit.raycluster import ensure_ray
    from unifit.records import write_parquet

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_cfg = model_config(args.model)
    model_cfg.max_length = args.max_length
    runs: dict[str, list[dict[str, Any]]] = {"unifit_packed": [], "unifit_padded": [], "hf_trainer_padded": []}
    with tempfile.TemporaryDirectory(prefix="unifit-train-bench-") as tmp:
        instances = write_parquet(conversations(args.conversations, seed=0), Path(tmp) / "instances.parquet")
        ensure_ray(ClusterConfig(num_cpus=args.threads, object_store_memory_gb=1))
        for repeat in range(args.repeats):  # alternated: this box's speed drifts by tens of percent over minutes
            runs["unifit_packed"].append(run_unifit(model_cfg, instances, args, True, Path(tmp) / f"packed{repeat}"))
            runs["unifit_padded"].append(run_unifit(model_cfg, instances, args, False, Path(tmp) / f"padded{repeat}"))
            runs["hf_trainer_padded"].append(run_hf_trainer_fresh(model_cfg, Path(tmp) / f"padded{repeat}", args, Path(tmp) / f"hf{repeat}"))
    best = {name: max(run["tokens_per_second"] for run in each) for name, each in runs.items()}
    packed, padded, hf = best["unifit_packed"], best["unifit_padded"], best["hf_trainer_padded"]
    report = {"model": args.model, "conversations": args.conversations, "epochs": 1, "micro_batch": args.batch,
              "max_length": args.max_length, "threads": args.threads, "repeats": args.repeats, "runs": runs,
              "best_tokens_per_second": best, "packed_vs_padded": packed / padded,
              "unifit_padded_vs_hf_trainer": padded / hf, "unifit_packed_vs_hf_trainer": packed / hf}
    print(json.dumps(report, indent=2))
    print(f"\npacked vs padded (same Ray+DeepSpeed path): {packed / padded:.2f}x   (goal >= 1.5x)")
    print(f"Ray+DeepSpeed padded vs HF Trainer padded: {padded / hf:.2f}x   (goal >= 1.0x)")
    print(f"Ray+DeepSpeed packed vs HF Trainer padded: {packed / hf:.2f}x")


def arch_bench(args: argparse.Namespace) -> dict[str, Any]:
    """A random-weight `--arch` model (bf16 on CUDA), packed rows of max_length tokens, activation checkpointing, NEFTune.

    Runs in one process, no Ray. `--engine deepspeed` trains through DeepSpeed ZeRO-2 with the workers' DeepSpeed
    config; `--engine torch` through plain torch AdamW (fused on CUDA), for a machine with only torch and transformers.
    The NEFTune hook, packing collation and segment attention are the training workers' own (unifit.training).
    """
    import torch

    from archs import build_llama
    from unifit.training.attention import attention_for
    from unifit.training.data import collate, model_inputs
    from unifit.training.neftune import NEFTuneHook
    from unifit.training.sft import _flash_attn_available

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    attn, mask_mode = attention_for(packing=True, flash=cuda and _flash_attn_available())
    model = build_llama(args.arch, args.device, dtype, attn_implementation=attn)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    params = sum(p.numel() for p in model.parameters())
    neftune = NEFTuneHook(args.neftune_alpha, generator=torch.Generator(device=args.device).manual_seed(0))
    neftune.attach(model)
    if args.engine == "deepspeed":
        import deepspeed

        from unifit.config import DeepSpeedConfig, TrainConfig
        from unifit.training.sft import deepspeed_config

        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}.items():
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        train = TrainConfig(global_batch_size=args.batch, micro_batch_size=args.batch, learning_rate=1e-5)
        ds_config = deepspeed_config(DeepSpeedConfig(zero_stage=2, offload_optimizer=args.offload_optimizer), train, 1, bf16=cuda)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        forward, backward, step = engine, engine.backward, engine.step
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
        forward, backward = model, lambda loss: loss.backward()

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    vocab = model.config.vocab_size
    generator = random.Random(0)

    def packed_batch() -> dict[str, Any]:
        rows = []
        for _ in range(args.batch):
            ids, positions = [], []
            while len(ids) < args.max_length:
                size = min(generator.randint(64, 1024), args.max_length - len(ids))
                ids.extend(generator.randrange(vocab) for _ in range(size))
                positions.extend(range(size))
            rows.append({"input_ids": ids, "labels": ids, "position_ids": positions})
        return collate(rows, 0, packed=True, mask_mode=mask_mode)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    model.train()
    tokens, seconds, losses = 0, 0.0, []
    for index in range(args.warmup + args.steps):
        batch = packed_batch()
        inputs = model_inputs(batch, args.device)
        neftune.attention_mask = batch["attention_mask"].to(args.device)  # as the training workers set it
        neftune.segment_ids = batch["segment_ids"].to(args.device) if "segment_ids" in batch else None
        sync()
        start = time.perf_counter()
        loss = forward(**inputs).loss
        backward(loss)
        step()
        sync()
        losses.append(float(loss.detach()))
        if index >= args.warmup:
            seconds += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
    tokens_per_second = tokens / seconds
    report = {"arch": args.arch, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."),
              "engine": args.engine, "params": params, "attn": attn, "neftune_alpha": args.neftune_alpha, "packing": True,
              "gradient_checkpointing": True, "micro_batch": args.batch, "seq_len": args.max_length,
              "timed_steps": args.steps, "tokens": tokens, "seconds": seconds, "losses": losses,
              "offload_optimizer": args.offload_optimizer, "tokens_per_second": tokens_per_second,
              "peak_tflops": args.peak_tflops, "mfu": 6 * params * tokens_per_second / (args.peak_tflops * 1e12),
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    print(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="tiny_random", help="conf/model/<name>.yaml for the CPU runs")
    parser.add_argument("--arch", choices=["llama7b", "tiny"], default=None,
                        help="train this random-weight architecture in one process (default on cuda: llama7b); "
                             "tiny on cpu checks the GPU command end to end")
    parser.add_argument("--engine", choices=["deepspeed", "torch"], default="deepspeed",
                        help="--arch runs: DeepSpeed ZeRO-2, or plain torch AdamW (a machine without DeepSpeed)")
    parser.add_argument("--neftune-alpha", type=float, default=5.0, help="--arch runs: NEFTune noise (0 = off)")
    parser.add_argument("--json-out", type=Path, help="--arch runs: also write the report to this file")
    parser.add_argument("--conversations", type=int, default=48, help="CPU: one epoch over them per run")
    parser.add_argument("--steps", type=int, default=10, help="GPU: timed steps")
    parser.add_argument("--batch", type=int, default=4, help="micro batch = global batch (one worker, no accumulation)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="CPU: alternating rounds of the three runs; each one's fastest counts")
    parser.add_argument("--warmup", type=int, default=2, help="GPU: untimed steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--offload-optimizer", action="store_true", help="GPU: ZeRO-2 optimizer state in CPU memory (7B AdamW on one 80 GB GPU)")
    args = parser.parse_args()
    if args.device == "cuda" and args.arch is None:
        args.arch = "llama7b"
    if args.arch:
        report = arch_bench(args)
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()
