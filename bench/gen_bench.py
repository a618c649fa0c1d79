"""Generation throughput: a model client over Ray actors (batched, left-padded) vs one prompt at a time, same run, same prompts.

    python bench/gen_bench.py [--n 48] [--n-seq 8] [--max-new-tokens 48] [--actors 2] [--batch-size 8]

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

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = ["SPF records", "DKIM signatures", "DMARC policies", "open mail relays", "DNS cache poisoning", "DNSSEC", "zone transfers",
          "BGP route hijacking", "RPKI", "CDN edge caching", "origin shielding", "certificate transparency", "OCSP stapling",
          "certificate pinning", "phishing detection", "greylisting", "anycast routing", "TLS termination", "DNS over HTTPS",
          "email header forensics", "key rotation", "revocation lists", "route leaks", "rate limiting"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="prompts for the Ray run")
    parser.add_argument("--n-seq", type=int, default=8, help="prompts for the sequential run (the first n-seq of the same prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

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
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=backend.temperature, top_p=backend.top_p,
                              repetition_penalty=backend.repetition_penalty, seed=0)
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
