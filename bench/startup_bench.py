"""Model start-ups saved by the shared pools: the demo's generate and evaluate, each run twice on this code.

`shared`: as the pipeline runs, one pool per model for the whole stage (each model loaded once per actor).
`per_call`: every call that reaches a model starts a pool of its own and releases it when the call ends, as
before the model client (a new Ray Data actor pool per call). Nothing else differs (same code, same settings, the
completion cache off so every call reaches its model, seeded sampling), so the difference in a stage's time is
what the start-ups cost; the bench checks that both modes wrote the same outputs.

    python bench/startup_bench.py --out /tmp/startup [KEY=VALUE ...]

runs the demo's stages up to finetune once in <out>/run (its generate is the `shared` generate), then generate
`per_call` in <out>/per_call, then evaluate in <out>/run in both modes; extra KEY=VALUE go to every launch. Per
stage and mode it prints the stage's seconds, model loads, the seconds the loads took inside their actors, from
request to ready per actor, and inside model calls; the numbers go to <out>/startup_bench.json. One launch in one
mode, to repeat a measurement: `python bench/startup_bench.py --child per_call -- run_dir=... 'stages=[evaluate]'
backend.cache=false`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
UP_TO_FINETUNE = "[generate,sample,train_scorer,score,select,finetune]"
NO_CACHE = ["backend.cache=false", "wandb.mode=disabled"]  # the demo judges with `backend` (judge_backend unset)
OUTPUTS = {"generate": ["instances", "self_instruct"], "evaluate": ["judge.json", "diversity.json", "ifeval.json"]}


def use_a_pool_per_call() -> None:
    """Give every model call a pool of its own, released when the call ends; its serving counts go to the stage's pool."""
    from unifit.llm.actors import ActorPool, PoolStats
    from unifit.llm.client import ModelClient, _LazyActorPool

    run = ModelClient._run

    def run_on_own_pool(self: ModelClient, method: str, conversations: list[Any], argument: Any) -> list[Any]:
        shared = self.pool
        if not isinstance(shared, ActorPool):
            return run(self, method, conversations, argument)
        own = _LazyActorPool(shared.owner, shared.model_cfg, shared.backend)
        caller = copy.copy(self)  # shares the client's counters; concurrent calls each have their own pool
        caller.pool = own
        try:
            return run(caller, method, conversations, argument)
        finally:
            own.close()
            with shared._lock:
                for field in dataclasses.fields(PoolStats):
                    setattr(shared.stats, field.name, getattr(shared.stats, field.name) + getattr(own.stats, field.name))

    ModelClient._run = run_on_own_pool


def launch(mode: str, run_dir: Path, stages: str, overrides: list[str]) -> dict[str, Any]:
    """One `python -m unifit.launch` in its own process; the stages' seconds and metrics from its timings.json."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--",
               f"run_dir={run_dir}", f"stages={stages}", *NO_CACHE, *overrides]
    subprocess.run(command, cwd=REPO, check=True)
    return json.loads((run_dir / "timings.json").read_text())["stages"]


def digest(run_dir: Path, stage: str) -> dict[str, str]:
    """What the stage wrote that must not depend on the mode: parquet rows and JSON results, by content."""
    import pyarrow.parquet as pq

    from unifit.fingerprint import fingerprint

    found = {}
    for name in OUTPUTS[stage]:
        path = run_dir / stage / name
        if path.is_dir():
            found[name] = fingerprint([pq.read_table(f).drop_columns(["id"]).to_pylist() for f in sorted(path.glob("*.parquet"))])
        elif path.exists():
            found[name] = fingerprint(_without_timings(json.loads(path.read_text())))
    return found


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "second" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def row(stage: str, mode: str, timings: dict[str, Any]) -> dict[str, Any]:
    metrics = timings[stage]["metrics"]
    return {"stage": stage, "mode": mode, "stage_s": timings[stage]["seconds"],
            **{key: metrics.get(key, 0) for key in ("model_loads", "model_calls", "model_load_seconds",
                                                     "model_startup_seconds", "model_call_seconds")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where the runs go (required unless --child)")
    parser.add_argument("--child", choices=["shared", "per_call"], help="run one launch in this mode with the overrides given")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.child:
        if args.child == "per_call":
            use_a_pool_per_call()
        sys.argv = ["unifit.launch", *args.overrides]
        runpy.run_module("unifit.launch", run_name="__main__", alter_sys=True)
        return 0
    if args.out is None:
        parser.error("--out is required")

    for name in ("run", "per_call"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    run_dir, per_call_dir = args.out / "run", args.out / "per_call"
    rows = [row("generate", "shared", launch("shared", run_dir, UP_TO_FINETUNE, args.overrides))]
    rows.append(row("generate", "per_call", launch("per_call", per_call_dir, "[generate]", args.overrides)))
    same = {"generate": digest(run_dir, "generate") == digest(per_call_dir, "generate")}
    evaluated = {}
    for mode in ("shared", "per_call"):
        shutil.rmtree(run_dir / "evaluate", ignore_errors=True)
        rows.append(row("evaluate", mode, launch(mode, run_dir, "[evaluate]", args.overrides)))
        evaluated[mode] = digest(run_dir, "evaluate")
    same["evaluate"] = evaluated["shared"] == evaluated["per_call"]

    print("| stage | mode | stage s | model loads | model calls | load s (in actors) | request to ready s | in model calls s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['mode']} | {r['stage_s']:.1f} | {r['model_loads']} | {r['model_calls']} | "
              f"{r['model_load_seconds']:.1f} | {r['model_startup_seconds']:.1f} | {r['model_call_seconds']:.1f} |")
    for stage, equal in same.items():
        print(f"{stage}: {'the same' if equal else 'DIFFERENT'} outputs in both modes")
    (args.out / "startup_bench.json").write_text(json.dumps({"overrides": args.overrides, "rows": rows, "same_outputs": same}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
