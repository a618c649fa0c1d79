"""launch/ray_env.sh decisions (GPUs per node, port clashes), launch/cluster_env.py failing fast, the
launch/ scripts on a private local cluster (start_head + join_worker, start_head + submit) and the job plan
of slurm/sweep.sh.

Most run the real shell functions with the environments Slurm and a VM give a node; the cluster tests start
their own Ray nodes on private ports and temp dirs and stop them by PID, never touching another Ray.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import compose_config, processes_mentioning

from unifit.records import read_parquet

REPO = Path(__file__).resolve().parents[2]
RAY_ENV = REPO / "launch" / "ray_env.sh"
SWEEP = REPO / "slurm" / "sweep.sh"
SUBMIT = REPO / "launch" / "submit.sh"
SHARED_STAGES = ["generate", "sample", "train_scorer", "score", "select"]


def _bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `script` after sourcing ray_env.sh, in exactly `env` (plus a PATH without nvidia-smi)."""
    clean = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), **env}
    return subprocess.run(["bash", "-c", f'source "{RAY_ENV}"; {script}'], env=clean, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize(("env", "gpus"), [
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_TASK": ""}, "4"),  # --gres=gpu:4
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0,1"}, "2"),  # older Slurm: only the step's devices
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "MIG-GPU-5c89/1/0"}, "1"),  # a MIG slice is one device
    ({"SLURM_JOB_ID": "7"}, "0"),  # a Slurm step without GPUs gets none, even on a GPU node
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": ""}, "0"),
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "0"),
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8", "UNIFIT_RAY_GPUS": "2"}, "2"),  # explicit override wins
    ({}, "0"),  # outside Slurm, no CUDA_VISIBLE_DEVICES and no nvidia-smi: a CPU node
])
def test_gpus_per_node(env: dict[str, str], gpus: str) -> None:
    result = _bash("unifit_gpus_here", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == gpus


def test_cpus_per_node_follows_the_allocation() -> None:
    assert _bash("unifit_cpus_here", {"SLURM_CPUS_ON_NODE": "12"}).stdout.strip() == "12"
    assert _bash("unifit_cpus_here", {"SLURM_CPUS_ON_NODE": "12", "UNIFIT_RAY_CPUS": "3"}).stdout.strip() == "3"


def test_auth_mode_is_explicit_but_overridable() -> None:
    assert _bash('echo "$RAY_AUTH_MODE"', {}).stdout.strip() == "disabled"
    assert _bash('echo "$RAY_AUTH_MODE"', {"RAY_AUTH_MODE": "token"}).stdout.strip() == "token"


def test_port_in_use_is_refused_with_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _bash(f"unifit_check_ports_free {port - 2} {port + 2}", {})
    assert result.returncode != 0
    assert f"port {port} is in use" in result.stderr and "UNIFIT_RAY_PORT" in result.stderr


def test_cluster_env_fails_fast_when_the_ray_step_died() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "cluster_env.py"), "--nodes", "2", "--timeout", "60",
         "--watch-pid", str(dead.pid)],
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and time.monotonic() - started < 20
    assert f"[{dead.pid}] ended before the cluster was up" in result.stderr
    assert result.stdout == ""  # nothing for the job script to eval


def test_cluster_env_times_out_with_a_clear_error() -> None:
    result = subprocess.run([sys.executable, str(REPO / "launch" / "cluster_env.py"), "--nodes", "1", "--timeout", "3"],
                            env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "has 0 of 1 nodes after 3s" in result.stderr


def _node_env(base: int, **extra: str) -> dict[str, str]:
    """A small node (1 CPU, no GPU, 100 MB object store) of the cluster with base port `base`."""
    return {**os.environ, "UNIFIT_RAY_PORT": str(base), "UNIFIT_RAY_CPUS": "1", "UNIFIT_RAY_GPUS": "0",
            "UNIFIT_RAY_START_ARGS": "--object-store-memory=100000000", **extra}


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid`: Ray's daemons, workers and a job's driver, whose command lines need
    not name the temp dir."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _stop_nodes(nodes: list[subprocess.Popen[bytes]], temp: str) -> list[str]:
    """End the nodes as ending an srun step does (TERM to each `ray start --block`, workers first), remove
    `temp`; return what is left of them."""
    below = {pid for node in nodes for pid in _descendants(node.pid)}
    for node in reversed(nodes):
        node.terminate()
    for node in nodes:
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    deadline = time.monotonic() + 20  # Ray's workers may end a moment after `ray start` returns
    while (alive := {pid for pid in below if _running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = processes_mentioning(temp) + [f"{pid}: {_cmdline(pid)}" for pid in alive if _running(pid)]
    shutil.rmtree(temp, ignore_errors=True)
    return leftover


def _running(pid: int) -> bool:
    """True while `pid` runs; a zombie (ended, waiting for whoever adopted it to reap it) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


def _free_base_port() -> int:
    """A port P with P, P+1 and P+2 free (a cluster's fixed ports)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))
            base = probe.getsockname()[1]
        if base + 2 < 65536 and all(_port_free(port) for port in (base, base + 1, base + 2)):
            return base
    raise RuntimeError("no 3 consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_start_head_and_join_worker_form_a_cluster_that_stops_by_pid(tmp_path: Path) -> None:
    """Head and worker on this host (each its own temp dir): 2 nodes join; ending the 2 processes stops all."""
    from ray.util import get_node_ip_address

    base = _free_base_port()
    temp = tempfile.mkdtemp(prefix="unifit-rl-", dir="/tmp")  # short: Ray's socket paths live under it
    env = _node_env(base, UNIFIT_RAY_DASHBOARD="0")
    address = f"{get_node_ip_address()}:{base}"
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        with open(tmp_path / "head.log", "wb") as log:
            nodes.append(subprocess.Popen([str(REPO / "launch" / "start_head.sh")], stdout=log, stderr=log,
                                          env={**env, "UNIFIT_RAY_TMPDIR": f"{temp}/head"}))
        with open(tmp_path / "worker.log", "wb") as log:
            nodes.append(subprocess.Popen([str(REPO / "launch" / "join_worker.sh"), address], stdout=log, stderr=log,
                                          env={**env, "UNIFIT_RAY_TMPDIR": f"{temp}/worker"}))
        size = subprocess.run(
            [sys.executable, str(REPO / "launch" / "cluster_env.py"), "--nodes", "2", "--timeout", "90",
             *[arg for node in nodes for arg in ("--watch-pid", str(node.pid))]],
            env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120)
        assert size.returncode == 0, size.stderr + (tmp_path / "head.log").read_text() + (tmp_path / "worker.log").read_text()
        assert size.stdout.split() == ["export", "UNIFIT_CLUSTER_NODES=2", "UNIFIT_CLUSTER_CPUS=2",
                                       "UNIFIT_CLUSTER_GPUS=0", "UNIFIT_CPUS_PER_ACTOR=1"]
        assert list(Path(temp, "head").glob("session_*")) and list(Path(temp, "worker").glob("session_*"))
    finally:
        leftover = _stop_nodes(nodes, temp)
    assert leftover == [], leftover


def _submit(*overrides: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SUBMIT), *overrides], env={**os.environ, "RAY_ADDRESS": address, "WANDB_MODE": "disabled"},
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(("address", "overrides", "message"), [
    ("", [], "set RAY_ADDRESS to the URL of the head's dashboard"),
    ("127.0.0.1:6379", [], "not its GCS address"),  # the join address, not the job server
    ("http://127.0.0.1:9", ["run_dir=runs/x"], "a relative run_dir would land in the job's temporary copy"),
    ("http://127.0.0.1:9", [], "no Ray job server at RAY_ADDRESS=http://127.0.0.1:9"),  # port 9: nothing listens
])
def test_submit_refuses_user_errors_in_one_line(address: str, overrides: list[str], message: str) -> None:
    result = _submit(*overrides, address=address)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_start_head_refuses_a_dashboard_without_ray_default(tmp_path: Path) -> None:
    """Without ray[default] Ray would quietly start a dashboard with no job server; the script says what to install."""
    (tmp_path / "aiohttp_cors.py").write_text('raise ImportError("No module named aiohttp_cors")')  # as if not installed
    env = _node_env(_free_base_port(), PYTHONPATH=str(tmp_path), UNIFIT_RAY_TMPDIR=str(tmp_path / "ray"))
    result = subprocess.run([str(REPO / "launch" / "start_head.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'pip install "ray[default]==' in result.stderr, result.stderr
    assert "UNIFIT_RAY_DASHBOARD=0" in result.stderr and not (tmp_path / "ray").exists()


def _wait_for_job_server(url: str, head: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Until the dashboard answers; start_head.sh returns to nobody, so poll (and fail if the head died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, f"start_head.sh ended with {head.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no dashboard at {url} after {timeout:.0f}s:\n{log.read_text()}")


def test_submit_runs_a_job_on_a_head_from_start_head(tmp_path: Path) -> None:
    """start_head.sh (dashboard on by default) + submit.sh: the checkout is uploaded and runs as a Ray job on
    the head, a failing run fails the script, a good one writes its run directory; ending the head by PID
    leaves no process of it behind."""
    base = _free_base_port()
    temp = tempfile.mkdtemp(prefix="unifit-rs-", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard = f"http://127.0.0.1:{base + 2}"
    run = ["+experiment=select_only", "stages=[generate,sample]", "wandb.mode=disabled",
           "cluster=slurm_cpu"]  # the CPU pools of a Ray cluster: cluster=ray sizes them per GPU
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        with open(tmp_path / "head.log", "wb") as log:
            nodes.append(subprocess.Popen([str(REPO / "launch" / "start_head.sh")], stdout=log, stderr=log,
                                          env=_node_env(base, UNIFIT_RAY_TMPDIR=temp)))
        _wait_for_job_server(dashboard, nodes[0], tmp_path / "head.log")

        failed = _submit(*run, f"data.path={tmp_path / 'missing.json'}", f"run_dir={tmp_path / 'bad'}", address=dashboard)
        assert failed.returncode != 0 and "unifit: error: data.path" in failed.stdout, failed.stdout + failed.stderr

        run_dir = tmp_path / "run"
        done = _submit(*run, f"data.path={REPO / 'tests' / 'data' / 'import' / 'alpaca.json'}", f"run_dir={run_dir}",
                       address=dashboard)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "cluster_env: 1 node(s) up" in done.stdout  # run_driver.sh sized the pools from this cluster
        for stage in ("generate", "sample"):
            assert json.loads((run_dir / stage / "manifest.json").read_text())["stage"] == stage
        instances = read_parquet(run_dir / "generate" / "instances")
        assert len(instances) == 3 and "What does SPF check?" in {row["messages"][0]["content"] for row in instances}
        assert 1 <= len(read_parquet(run_dir / "sample" / "sample.parquet")) <= 3
    finally:
        leftover = _stop_nodes(nodes, temp)
    assert leftover == [], leftover


def _sweep_plan(*overrides: str, **env: str) -> list[list[str]]:
    """The sbatch commands slurm/sweep.sh would submit (SWEEP_DRY_RUN=1), each split into its arguments."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SWEEP_")}
    result = subprocess.run(["bash", str(SWEEP), *overrides], env={**clean, "SWEEP_DRY_RUN": "1", **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line)[1:] for line in result.stderr.splitlines() if line.startswith("sbatch ")]


def _option(command: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}="))


def _hydra_args(command: list[str]) -> list[str]:
    return command[command.index("slurm/unifit.sbatch") + 1:]


def test_sweep_plan_shares_one_generation_and_one_selection() -> None:
    models = ["llama2_7b", "mistral_7b", "baichuan2_7b", "qwen_7b"]
    plan = _sweep_plan("train.epochs=2", SWEEP_SCORER="mistral_7b", SWEEP_SBATCH_ARGS="--partition=gpu --nodes=2",
                       SWEEP_CPU_SBATCH_ARGS="--partition=cpu")
    shared, runs, report = plan[0], plan[1:-1], plan[-1]
    assert [_option(c, "job-name") for c in plan] == ["unifit-shared", *[f"unifit-{m}" for m in models], "unifit-report"]
    common = ["+experiment=cyber_500k", "+model@generator=llama2_7b", "+model@scorer=mistral_7b", "shared_dir=runs/shared"]
    assert _hydra_args(shared) == [*common, "model=llama2_7b", "run_dir=runs/cyber_500k-shared",
                                   f"stages=[{','.join(SHARED_STAGES)}]", "train.epochs=2"]
    for model, command in zip(models, runs):
        assert _option(command, "dependency") == "afterok:<unifit-shared>" and "--kill-on-invalid-dep=yes" in command
        assert _hydra_args(command) == [*common, f"model={model}", f"run_dir=runs/cyber_500k-{model}", "train.epochs=2"]
    for command in (shared, *runs):
        assert command[:2] == ["--partition=gpu", "--nodes=2"]
    assert "--partition=cpu" in report and "--gpus-per-node=0" in report and "--partition=gpu" not in report
    assert _option(report, "dependency") == "afterany:" + ":".join(f"<unifit-{m}>" for m in models)
    assert shlex.split(report[-1]) == ["python", "-m", "unifit.report", *[f"runs/cyber_500k-{m}" for m in models],
                                       "--out", "runs/cyber_500k-sweep-report"]
    assert not any("data.path" in arg for command in plan for arg in command)  # no import of a merged copy any more


def test_sweep_jobs_agree_on_the_shared_stages_fingerprints() -> None:
    """What the model jobs find in shared_dir is exactly what the first job computed: equal fingerprints
    (composing the printed overrides needs no weights: the 7B configs are hub ids)."""
    from unifit.pipeline import stage_fingerprints

    plan = _sweep_plan()
    configs = [compose_config(_hydra_args(command)) for command in plan[:-1]]
    prints = [stage_fingerprints(cfg) for cfg in configs]
    assert configs[0].stages == SHARED_STAGES and all(len(cfg.stages) == 8 for cfg in configs[1:])
    assert {cfg.shared_dir for cfg in configs} == {"runs/shared"}
    for stage in SHARED_STAGES[:-1]:
        assert len({p[stage] for p in prints}) == 1, stage
    # select checks the shared scorer against each model (same Pithy subset from the same scores): per model
    assert len({p["select"] for p in prints[1:]}) == len(prints) - 1 and prints[0]["select"] == prints[1]["select"]
    assert len({p["finetune"] for p in prints[1:]}) == len(prints) - 1  # each model tunes (and is judged) on its own
