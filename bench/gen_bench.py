"""Generation throughput: a model client over Ray actors (batched, left-padded) vs one prompt at a time, same run, same prompts.

    python bench/gen_bench.py [--n 48] [--n-seq 8] [--max-new-tokens 48] [--actors 2] [--batch-size 8]
    python bench/gen_bench.py --arch llama7b --device cuda --n 64 --batch-size 32 --n-seq 4   # no Ray: `arch_bench`

Model: the embedded SmolLM2-135M-Instruct (ModelConfig() default). Baseline: HFChatModel with batch
size 1 in this process (torch uses every core) on the first `n-seq` prompts (a rate, so a subset keeps the
bench short). Ray: a model client (`unifit.llm.client`) with `actors` x 1 CPU, batch `batch-size`, completion
cache off. Its actors start on the first call and serve every later one, so start-up is measured as a first call
that starts every actor (one batch each, one token), and the steady-state rate is the next call on all `n` prompts. Prints output tokens/s and the ratios. The prompts are concept-tree leaf prompts, sampled with the
pipeline's default settings (temperature 0.7, top-p 0.95, repetition penalty 1.2).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = ["SPF records", "DKIM signatures", "DMARC policies", "open mail relays", "DNS cache poisoning", "DNSSEC", "zone transfers",
          "BGP route hijacking", "RPKI", "CDN edge caching", "origin shielding", "certificate transparency", "OCSP stapling",
          "certificate pinning", "phishing detection", "greylisting", "anycast routing", "TLS termination", "DNS over HTTPS",
          "email header forensics", "key rotation", "revocation lists", "route leaks", "rate limiting"]


def arch_bench(args: argparse.Namespace) -> dict:
    """Batched HF `generate` (left-padded) against batch 1, on a random-weight `--arch` model, no Ray.

    Prompts are random token ids of 32-256 tokens; every completion is exactly max_new_tokens long (EOS is
    suppressed by min_new_tokens), so both sides decode the same number of tokens per prompt. Greedy decoding.
    """
    import json
    import random
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from archs import build_llama

    cuda = args.device == "cuda"
    model = build_llama(args.arch, args.device, torch.bfloat16 if cuda else torch.float32).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(32, 256))] for _ in range(args.n)]

    def generate(batch: list[list[int]]) -> int:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
        return int(out.shape[0] * (out.shape[1] - width))

    def timed(fn: Any) -> tuple[int, float]:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    with torch.inference_mode():
        generate(prompts[:2])  # warm-up
        batched_tokens, batched_s = timed(lambda: sum(generate(prompts[i : i + args.batch_size])
                                                      for i in range(0, len(prompts), args.batch_size)))
        single_tokens, single_s = timed(lambda: sum(generate([p]) for p in prompts[: args.n_seq]))
    report = {"arch": args.arch, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "dtype": "bfloat16" if cuda else "float32", "prompts": args.n, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "batched_tokens": batched_tokens, "batched_seconds": batched_s,
              "batched_tokens_per_s": batched_tokens / batched_s, "batch1_prompts": args.n_seq,
              "batch1_tokens": single_tokens, "batch1_seconds": single_s, "batch1_tokens_per_s": single_tokens / single_s,
              "speedup": (batched_tokens / batched_s) / (single_tokens / single_s)}
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="prompts for the Ray run")
    parser.add_argument("--n-seq", type=int, default=8, help="prompts for the sequential run (the first n-seq of the same prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--arch", choices=["llama7b", "tiny"], default=None,
                        help="instead: plain batched HF generate on this random-weight architecture, no Ray (see arch_bench)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="--arch runs only")
    parser.add_argument("--json-out", type=Path, help="--arch runs: also write the report to this file")
    args = parser.parse_args()
    if args.arch:
        arch_bench(args)
        return

    import ray

    from unifit.config import BackendConfig, ClusterConfig, GenerateConfig, ModelConfig, UnifitConfig
    from unifit.llm.base import GenerationParams
    from unifit.llm.hf import HFChatModel
    from unifit.llm.client import ModelClients
    from unifit.models import resolve_model_dir

    load = os.getloadavg()  # the machine may be shared: a busy host lowers both numbers
    gen = GenerateConfig()
    prompts = [[{"role": "user", "content": gen.leaf_prompt.format(q=2, leaf=TOPICS[i % len(TOPICS)], path=f"cybersecurity > {TOPICS[i % len(TOPICS)]}")}]
               for i in range(args.n)]
    backend = BackendConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, cache=False)
    params = GenerationParams.from_backend(backend, seed=0)
    cfg = UnifitConfig(model=ModelConfig(), backend=backend,
                       cluster=ClusterConfig(generation_actors=args.actors, cpus_per_actor=1.0, num_cpus=args.actors))
    resolve_model_dir(cfg.model, cfg.cache_dir)  # convert the GGUF once, outside both timings

    import torch

    model = HFChatModel(cfg.model, cfg.cache_dir, batch_size=1)
    start = time.perf_counter()
    sequential = model.complete(prompts[: args.n_seq], params)
    seq_s = time.perf_counter() - start
    seq_tokens = sum(c.num_output_tokens for c in sequential)
    del model

    temp = Path(tempfile.mkdtemp(prefix="gen_bench_ray_"))
    (temp / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(temp)  # a private Ray: never join another cluster on this host
    ray.init(num_cpus=args.actors, object_store_memory=1 << 30, include_dashboard=False, _temp_dir=str(temp / "ray"), log_to_driver=False)
    clients = ModelClients(cfg.cluster, cfg.cache_dir)
    client = clients.connect(cfg.model, cfg.backend, "bench")
    try:
        start = time.perf_counter()
        client.complete(prompts[: args.actors * args.batch_size], dataclasses.replace(params, max_new_tokens=1, seed=1))
        client.pool.wait_ready()
        startup_s = time.perf_counter() - start
        start = time.perf_counter()
        batched = client.complete(prompts, params)
        steady_s = time.perf_counter() - start
    finally:
        clients.close()
        ray.shutdown()
    ray_s = startup_s + steady_s
    loads = clients.metrics()["model_loads"]
    ray_tokens = sum(c.num_output_tokens for c in batched)

    seq_rate, ray_rate, steady_rate = seq_tokens / seq_s, ray_tokens / ray_s, ray_tokens / steady_s
    print(f"model: {cfg.model.name} (embedded), prompts: {args.n_seq} sequential / {args.n} Ray, max_new_tokens: {args.max_new_tokens}, "
          f"torch threads (sequential): {torch.get_num_threads()}, cores: {os.cpu_count()}, load average at start: {load[0]:.1f}")
    print(f"sequential HF generate, batch 1:            {seq_tokens:5d} tokens in {seq_s:6.1f} s = {seq_rate:6.1f} tok/s")
    print(f"model client, {args.actors} actors x 1 CPU, batch {args.batch_size}: {ray_tokens:5d} tokens in {ray_s:6.1f} s "
          f"= {ray_rate:6.1f} tok/s (includes actor start-up)")
    print(f"actor start-up ({loads} model loads, one batch of 1 token each): {startup_s:.1f} s -> steady state {steady_rate:6.1f} tok/s")
    print(f"speed-up: {ray_rate / seq_rate:.2f}x end to end, {steady_rate / seq_rate:.2f}x steady state")


if __name__ == "__main__":
    main()
