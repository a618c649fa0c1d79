"""How the Self-Instruct novelty filter's cost grows with the pool: `NoveltyFilter(0.7).add_many` over stand-in tasks.

`python bench/novelty_bench.py --tasks 500000` draws tasks the way the stand-in server writes them (as alike as
real Alpaca instructions: tests/test_standin_server.py), adds them `NOVELTY_BATCH` at a time as `run_self_instruct`
does, and prints per block of `--every` tasks the seconds it took, the candidates per task, the LCS computed and
the process's RSS; at the end the memory the filter holds per 1,000 kept tasks (RSS growth after the first block).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from standin_server import StandinScript  # noqa: E402

from unifit.generation.self_instruct import NOVELTY_BATCH, NoveltyFilter  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=50_000)
    args = parser.parse_args()
    rng, script = random.Random(0), StandinScript()
    novelty = NoveltyFilter(0.7)
    process = psutil.Process()
    print("| tasks | block s | candidates per task | LCS computed | RSS GB |\n|---:|---:|---:|---:|---:|")
    started = block_start = time.perf_counter()
    block_first, block_candidates, first_block_end = 0, 0, None  # tasks and candidates before the block; (RSS, kept) after the first
    done = 0
    while done < args.tasks:
        size = min(NOVELTY_BATCH, args.tasks - done, args.every - done % args.every)  # a batch never spans two blocks
        novelty.add_many([script.task(rng) for _ in range(size)])
        done += size
        if done % args.every == 0 or done == args.tasks:
            now, rss = time.perf_counter(), process.memory_info().rss
            first_block_end = first_block_end or (rss, len(novelty))
            print(f"| {done:,} | {now - block_start:.1f} | {(novelty.candidates - block_candidates) / (done - block_first):.0f} | {novelty.lcs_checks:,} | "
                  f"{rss / 2**30:.2f} |", flush=True)
            block_start, block_first, block_candidates = now, done, novelty.candidates
    kept = len(novelty)
    per_k = (process.memory_info().rss - first_block_end[0]) / max(1, kept - first_block_end[1]) * 1000 / 2**20
    print(f"\n{kept:,} of {args.tasks:,} kept in {time.perf_counter() - started:.1f} s; RSS grew {per_k:.2f} MB per 1,000 kept tasks "
          "after the first block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
