"""How every stage's cost grows with the number of instances: the real pipeline, shaped like cyber_500k, at scale.

`python bench/scale_bench.py --instances 5000` runs `python -m unifit.launch +experiment=cyber_500k` (five
scopes, two turns, 100 questions per leaf; the tree is 5 × 10^depth leaves, so 5K, 50K and 500K instances
are depth 1, 2 and 3) one stage at a time, each stage its own driver process, against the stand-in GPU
server (tests/standin_server.py, a separate process): generation through the `openai` backend, the judge
the stand-in too, IFD scoring and training on `model=random_1x16` (1 layer, 16 wide: the data path is real,
the model's compute negligible), training capped at `--train-steps`. Per stage it prints wall time, the
driver's peak RSS, the largest Ray worker's peak RSS, the object store's peak (shared memory the raylet has
touched), model loads (hf models, vLLM engines and IFD scorers the stage reports; training's are not counted), time
inside model calls (the stand-in busy, the IFD scorers' forwards, the training loops) and outside them, and CPU seconds: the driver's, the driver's with every process it reaped (its Ray processes),
and the stand-in's; then the pipeline's own cost per 1,000 instances (wall time outside model calls, and
its processes' CPU time, which a machine shared with other jobs does not inflate) against what one GPU would
spend decoding those instances' tokens at `--gpu-tokens-per-s`. Each stage's output is in
<run dir>/bench-<stage>.log, its numbers in <run dir>/bench-<stage>.json; the table and the cost per 1,000 instances
cover every stage measured in that run directory, so a run made stage by stage (`--stages`, same `--out`) ends
with the whole run's. A rerun with the same `--out` resumes: a stage whose numbers are there is not run again
(delete its bench-<stage>.json to measure it again), an interrupted one resumes from its finished shards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from standin_server import parse_prometheus  # noqa: E402

STAGES = ("generate", "sample", "train_scorer", "score", "select", "finetune", "evaluate", "report")
KEY_ENV = "UNIFIT_STANDIN_KEY"
QUESTIONS_PER_LEAF, SUBCONCEPTS, SCOPES = 100, 10, 5


def shape(instances: int) -> tuple[int, int]:
    """(depth, questions per leaf) of the cyber_500k-shaped tree closest to `instances` (5 scopes × 10^depth leaves)."""
    depth = max(0, round(math.log10(max(1, instances / (SCOPES * QUESTIONS_PER_LEAF)))))
    leaves = SCOPES * SUBCONCEPTS**depth
    return depth, max(1, round(instances / leaves))


def overrides(instances: int, url: str, run_dir: Path, *, train_steps: int, test_questions: int) -> list[str]:
    """The launch command's overrides: cyber_500k, made local and pointed at the stand-in."""
    depth, questions = shape(instances)
    return ["+experiment=cyber_500k", "model=random_1x16", "backend=openai", "cluster=local", "deepspeed=zero2",
            f"backend.url={url}", "backend.api_model=standin-llm", f"backend.api_key_env={KEY_ENV}",
            "backend.max_new_tokens=16384", "backend.batch_size=64",
            f"judge_backend.url={url}", "judge_backend.api_model=standin-llm", f"judge_backend.api_key_env={KEY_ENV}",
            "judge.name=standin-llm", "judge.path=standin-llm",
            f"generate.depth={depth}", f"generate.questions_per_leaf={questions}", "generate.self_instruct.target=0",
            # the settings this bench was measured with (until cyber_500k stopped inheriting them from the CPU demo):
            # two_step asks each question and each answer in its own request, the most requests per instance
            "generate.leaf_mode=two_step", "generate.max_retries=1", "generate.self_instruct.max_rounds=3",
            "evaluate.ifeval_prompts=12", "evaluate.ifeval_max_new_tokens=96",
            "select.max_ifd=2",  # a random model's IFD is ~1: the paper's IFD < 1 cut could keep nothing
            f"train.max_steps={train_steps}", "train.global_batch_size=4", "train.micro_batch_size=4",
            "train.gradient_checkpointing=false", f"evaluate.num_test_questions={test_questions}",
            "evaluate.answer_max_new_tokens=32", "evaluate.diversity_draws=1", "evaluate.diversity_sample_size=20",
            "wandb.mode=disabled", f"run_dir={run_dir}"]


@dataclass
class StageResult:
    stage: str
    wall_s: float
    stage_s: Optional[float]  # the pipeline's own timer (manifest), without process start
    driver_peak_gb: float
    worker_peak_gb: float
    object_store_peak_gb: float
    model_loads: Optional[int]
    model_call_s: float  # the stand-in had a request in flight, or a local model ran (`local_model_seconds`)
    completion_tokens: int
    driver_cpu_s: float  # CPU time of the driver process (all its threads)
    pipeline_cpu_s: float  # CPU time of the driver and every process it started and reaped (Ray's included)
    server_cpu_s: float  # CPU time of the stand-in server meanwhile: the model work, on a GPU elsewhere in a real run

    @property
    def outside_s(self) -> float:
        return max(0.0, self.wall_s - self.model_call_s)


def _kib(status: str, field: str) -> int:
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


class Watcher:
    """Polls the driver and its descendants: peak RSS of the driver, of the largest Ray worker, and the raylet's
    shared memory (the object store's pages) — /proc's high-water marks, so short peaks between polls count."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.driver = self.worker = self.store = 0
        self.driver_cpu = 0.0

    def poll(self) -> None:
        self.driver = max(self.driver, _kib(_status(self.pid), "VmHWM"))
        try:
            self.driver_cpu = cpu_seconds(self.pid)
        except psutil.Error:
            pass
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            status = _status(child.pid)
            name = status.splitlines()[0].split(None, 1)[-1] if status else ""
            if "raylet" in name:
                self.store = max(self.store, _kib(status, "RssShmem"))
            elif name.startswith("ray::"):
                self.worker = max(self.worker, _kib(status, "VmHWM"))


def server_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as response:
        values = parse_prometheus(response.read().decode())
    return {"busy": sum(v for k, v in values.items() if k.startswith("standin:busy_seconds_total")),
            "tokens": sum(v for k, v in values.items() if k.startswith("vllm:generation_tokens_total"))}


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def run_stage(stage: str, args: argparse.Namespace, url: str, run_dir: Path, env: dict[str, str], server_pid: int) -> StageResult:
    """One stage in its own driver process; its output goes to <run_dir>/bench-<stage>.log (a pipe nobody reads
    while the stage runs would fill and stall the driver)."""
    command = [sys.executable, "-m", "unifit.launch", *overrides(args.instances, url, run_dir, train_steps=args.train_steps,
                                                                 test_questions=args.test_questions), *args.override, f"stages=[{stage}]"]
    before, server_before = server_metrics(url), cpu_seconds(server_pid)
    log_path = run_dir / f"bench-{stage}.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        watcher = Watcher(process.pid)
        while True:
            watcher.poll()
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # rusage: the driver and the children it reaped
            if pid:
                break
            time.sleep(0.5)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"stage {stage} failed (exit {process.returncode}):\n{log_path.read_text()[-4000:]}")
    after = server_metrics(url)
    manifest = json.loads((run_dir / stage / "manifest.json").read_text())
    counted = [manifest["metrics"][key] for key in ("model_loads", "engine_starts", "scorer_loads") if key in manifest["metrics"]]
    loads = sum(counted) if counted else None  # hf models and vLLM engines behind the clients, IFD scorers
    return StageResult(stage, wall, manifest.get("seconds"), watcher.driver / 2**20, watcher.worker / 2**20,
                       watcher.store / 2**20, loads, after["busy"] - before["busy"] + local_model_seconds(manifest["metrics"]),
                       int(after["tokens"] - before["tokens"]),
                       watcher.driver_cpu, usage.ru_utime + usage.ru_stime, cpu_seconds(server_pid) - server_before)


def local_model_seconds(metrics: dict[str, Any]) -> float:
    """Wall time a stage spent in the models that run on this machine: the IFD scorers' forwards (their sum over the
    actors that scored at once, divided by how many) and the training loops (`loop_seconds`, `<variant>_loop_seconds`,
    one after the other); the stand-in's own time is counted apart."""
    scorers = max(1, int(metrics.get("scorer_loads", 1)))
    return float(metrics.get("model_seconds", 0.0)) / scorers + sum(
        float(value) for key, value in metrics.items() if key == "loop_seconds" or key.endswith("_loop_seconds"))


def start_server(args: argparse.Namespace, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "standin_server.py"), "--api-key-env", KEY_ENV,
                               "--seconds-per-token", str(args.seconds_per_token), "--answer-words", str(args.answer_words)],
                              env=env, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    return server, json.loads(server.stdout.readline())["url"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=5000, help="about this many (5 × 10^depth leaves × questions)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a new temporary one); reuse to resume")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in pipeline order")
    parser.add_argument("--train-steps", type=int, default=50, help="train.max_steps of every fine-tune")
    parser.add_argument("--test-questions", type=int, default=100)
    parser.add_argument("--answer-words", type=int, default=60, help="the stand-in's mean answer length")
    parser.add_argument("--seconds-per-token", type=float, default=0.0, help="the stand-in's decode delay (0 = full speed)")
    parser.add_argument("--gpu-tokens-per-s", type=float, default=2500.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="one more launch override, after the bench's own (repeatable; e.g. generate.self_instruct.enabled=false)")
    args = parser.parse_args()

    run_dir = (args.out or Path(tempfile.mkdtemp(prefix="scale_bench-"))).resolve()
    ray_tmp = Path(tempfile.mkdtemp(prefix="usb", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: uuid.uuid4().hex, "RAY_TMPDIR": str(ray_tmp),
           "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    server, url = start_server(args, env)
    try:
        for stage in args.stages.split(","):
            measured = run_dir / f"bench-{stage}.json"
            if measured.exists():
                print(f"{stage}: measured before ({measured})", file=sys.stderr)
                continue
            result = run_stage(stage, args, url, run_dir, env, server.pid)
            measured.write_text(json.dumps(asdict(result), indent=2))
            print(f"{stage}: {result.wall_s:.1f}s", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait()
    # every stage measured in this run directory, this invocation's and earlier ones' (a run made stage by stage)
    results = [StageResult(**json.loads(path.read_text())) for stage in STAGES if (path := run_dir / f"bench-{stage}.json").exists()]
    instances = sum(pq_rows(run_dir / "generate" / "instances"))
    print_table(results, instances, args, run_dir)
    if args.json:
        args.json.write_text(json.dumps({"instances": instances, "run_dir": str(run_dir), "args": vars(args) | {"out": str(args.out), "json": str(args.json)},
                                         "stages": [asdict(r) | {"outside_s": r.outside_s} for r in results]}, indent=2))
    return 0


def pq_rows(path: Path) -> list[int]:
    import pyarrow.parquet as pq

    return [pq.ParquetFile(f).metadata.num_rows for f in sorted(path.glob("*.parquet"))]


def print_table(results: list[StageResult], instances: int, args: argparse.Namespace, run_dir: Path) -> None:
    print(f"\n{instances:,} instances, run directory {run_dir}")
    print("| stage | wall s | stage s | driver peak GB | largest worker GB | object store GB | model loads | in model calls s "
          "| outside s | driver CPU s | pipeline CPU s | stand-in CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        loads = "–" if r.model_loads is None else str(r.model_loads)
        stage_s = "–" if r.stage_s is None else f"{r.stage_s:.1f}"
        print(f"| {r.stage} | {r.wall_s:.1f} | {stage_s} | {r.driver_peak_gb:.2f} | {r.worker_peak_gb:.2f} | "
              f"{r.object_store_peak_gb:.2f} | {loads} | {r.model_call_s:.1f} | {r.outside_s:.1f} | {r.driver_cpu_s:.1f} | "
              f"{r.pipeline_cpu_s:.1f} | {r.server_cpu_s:.1f} |")
    tokens = sum(r.completion_tokens for r in results)
    per_k = 1000 / max(1, instances)
    gpu = tokens / args.gpu_tokens_per_s
    if not gpu:
        print("\nno output tokens were generated")
        return
    print(f"\none GPU's decode time for the {tokens * per_k:,.0f} output tokens per 1,000 instances at "
          f"{args.gpu_tokens_per_s:,.0f} tokens/s: {gpu * per_k:.1f} s; the pipeline's own cost per 1,000 instances (goal <= 10% of it):")
    for label, own in (("wall time outside model calls", sum(r.outside_s for r in results)),
                       ("CPU time of the pipeline's processes", sum(r.pipeline_cpu_s for r in results))):
        print(f"  {label}: {own * per_k:.2f} s = {own / gpu:.1%}")


if __name__ == "__main__":
    sys.exit(main())
