"""The project's own slurm/unifit.sbatch on a real Slurm (Debian's slurm-wlm + munge), one node and two.

tests/cluster/slurm_up.sh brings up munged, slurmctld and slurmd under a private directory; the smoke
experiment is submitted exactly as a user would (`sbatch slurm/unifit.sbatch +experiment=smoke ...`), so the
Ray head runs in an srun step, the driver joins it through RAY_ADDRESS, and teardown ends the step. The
two-node Slurm adds a slurmd in a network namespace, so the template's worker branch (a second srun step
joining Ray over a real interface) runs too.
Without Slurm installed the tests skip, except under CI=true, where a skip would hide a broken CI image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import SmokeRun, processes_mentioning

from unifit.config import STAGES
from unifit.records import read_parquet
from unifit.stage import read_json

REPO = Path(__file__).resolve().parents[2]
SLURM_UP = Path(__file__).with_name("slurm_up.sh")
TOOLS = ("sbatch", "squeue", "scancel", "scontrol", "srun", "sinfo", "slurmctld", "slurmd", "munged")
JOB_TIMEOUT_S = 780  # under pytest-timeout's 900 s; the smoke run itself takes a few minutes on 2 cores


def _slurm_path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin"  # slurmctld, slurmd and munged live in sbin


def _unavailable(nodes: int) -> str | None:
    missing = [tool for tool in (*TOOLS, *(("ip", "nsenter") if nodes > 1 else ())) if shutil.which(tool, path=_slurm_path()) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}): apt-get install -y slurm-wlm munge iproute2"
    if os.geteuid() != 0:
        return "a private Slurm needs root (slurmd launches jobs, munged runs as user munge; node 2 needs a network namespace)"
    return None


def _private_slurm(nodes: int) -> Iterator[tuple[dict[str, str], Path]]:
    """A running Slurm of `nodes` nodes: (environment with SLURM_CONF, its private directory); stopped after."""
    reason = _unavailable(nodes)
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        pytest.skip(reason)
    # Not pytest's tmp_path: munged (user munge) must traverse it, and Ray's socket paths under it stay short.
    directory = Path(tempfile.mkdtemp(prefix="unifit-slurm-", dir="/tmp"))
    env = {**os.environ, "PATH": _slurm_path(), "SLURM_CONF": str(directory / "slurm.conf")}
    try:
        up = subprocess.run([str(SLURM_UP), "up", str(directory), str(nodes)], capture_output=True, text=True, timeout=90, env=env)
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield env, directory
    finally:
        _cancel_all(env)  # a job left running would outlive slurmd (its slurmstepd and Ray keep going)
        subprocess.run([str(SLURM_UP), "down", str(directory)], timeout=90, env=env)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm() -> Iterator[tuple[dict[str, str], Path]]:
    """A single-node Slurm (this host)."""
    yield from _private_slurm(1)


@pytest.fixture(scope="module")
def slurm_two_nodes() -> Iterator[tuple[dict[str, str], Path]]:
    """A two-node Slurm: this host and a slurmd in a network namespace of its own (see slurm_up.sh)."""
    yield from _private_slurm(2)


def _cancel_all(env: dict[str, str], timeout: float = 90) -> None:
    """Cancel every job of this private Slurm and wait until they have left the queue."""
    def queued() -> list[str]:
        listed = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30)
        return listed.stdout.split() if listed.returncode == 0 else []

    jobs = queued()
    if jobs:
        subprocess.run(["scancel", *jobs], env=env, timeout=30)
    deadline = time.monotonic() + timeout
    while jobs and time.monotonic() < deadline:
        time.sleep(1)
        jobs = queued()


def _submit(env: dict[str, str], output: Path, *args: str, nodes: int = 1) -> str:
    """sbatch the project's template from the repository root, on CPU nodes; the job id."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--time=00:15:00", f"--output={output}",
         str(REPO / "slurm" / "unifit.sbatch"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def _wait(env: dict[str, str], job: str, output: Path, timeout: float) -> str:
    """Poll squeue until the job has left the queue (faster than sbatch --wait); the job's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True, timeout=30)
        if not queue.stdout.strip():
            return output.read_text() if output.exists() else ""
        time.sleep(2)
    subprocess.run(["scancel", job], env=env, timeout=30)
    tail = output.read_text()[-4000:] if output.exists() else "(no output)"
    pytest.fail(f"job {job} still running after {timeout:.0f}s; cancelled. Output tail:\n{tail}")


def _job_state(env: dict[str, str], job: str) -> tuple[str, str]:
    """(JobState, ExitCode) of a finished job; slurmctld keeps it for MinJobAge (300 s), no accounting needed."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    fields = dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
    return fields.get("JobState", shown.stderr.strip()), fields.get("ExitCode", "")


@pytest.mark.slow
def test_sbatch_runs_the_smoke_pipeline_on_the_jobs_ray(slurm: tuple[dict[str, str], Path], tmp_path: Path,
                                                        smoke_run: SmokeRun) -> None:
    env, directory = slurm
    ray_dir = directory / "ray"  # per job, like the default /tmp/ray-unifit-<job id>; short for Ray's sockets
    # The smoke run's completion cache: the model calls were paid once there; this test is about Slurm and Ray.
    env = {**env, "UNIFIT_RAY_TMPDIR": str(ray_dir), "WANDB_MODE": "disabled", "UNIFIT_CACHE": str(smoke_run.completion_cache),
           "UNIFIT_RAY_START_ARGS": "--object-store-memory=500000000 --include-dashboard=false"}
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    job = _submit(env, output, "+experiment=smoke", "cluster=slurm_cpu", f"run_dir={run_dir}", "wandb.mode=disabled")
    log = _wait(env, job, output, JOB_TIMEOUT_S)

    assert "unifit.sbatch: driver exited with status 0" in log, log[-4000:]
    assert _job_state(env, job) == ("COMPLETED", "0:0")
    for stage in STAGES:
        assert (run_dir / stage / "manifest.json").is_file(), f"stage {stage} has no manifest; job output:\n{log[-3000:]}"
    assert set(read_json(run_dir / "timings.json")["stages"]) == set(STAGES)
    # The driver ran its actors on the job's Ray (worker logs in the per-job temp dir), not on a private one.
    assert list(ray_dir.glob("session_*/logs/worker-*")), f"no Ray worker logs under {ray_dir}"
    # Teardown ended the srun step that owned the head: nothing of this job's Ray is left on the host.
    assert processes_mentioning(str(ray_dir)) == []


@pytest.mark.slow
def test_sbatch_on_two_nodes_joins_a_worker_by_srun_and_scores_on_both(slurm_two_nodes: tuple[dict[str, str], Path],
                                                                        tmp_path: Path, smoke_run: SmokeRun) -> None:
    """The multi-node branch of the template: a Ray worker joins from an srun step on node 2, the driver's IFD
    actors run on both nodes, the scores equal the single-node smoke run's, and teardown leaves nothing."""
    env, directory = slurm_two_nodes
    ray_dir = directory / "ray"
    # One CPU per Ray node and one per scoring actor: each node holds exactly one actor.
    env = {**env, "UNIFIT_RAY_TMPDIR": str(ray_dir), "WANDB_MODE": "disabled", "UNIFIT_CACHE": str(smoke_run.completion_cache),
           "UNIFIT_RAY_CPUS": "1", "UNIFIT_RAY_START_ARGS": "--object-store-memory=300000000"}
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    shutil.copytree(smoke_run.run_dir, run_dir)  # the smoke run's scoring model and instances; score again
    shutil.rmtree(run_dir / "score")
    job = _submit(env, output, "+experiment=smoke", "cluster=slurm_cpu", f"run_dir={run_dir}", "wandb.mode=disabled",
                  "stages=[score]", "cluster.cpus_per_actor=1", nodes=2)
    log = _wait(env, job, output, 600)

    assert "unifit.sbatch: driver exited with status 0" in log, log[-4000:]
    assert _job_state(env, job) == ("COMPLETED", "0:0")
    node_names = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], env=env, capture_output=True, text=True, timeout=30).stdout.split()
    assert len(node_names) == 2
    assert f"[{node_names[1]}] ray worker:" in log and "cluster_env: 2 node(s) up" in log, log[-4000:]
    metrics = read_json(run_dir / "timings.json")["stages"]["score"]["metrics"]
    assert metrics["shards_computed"] == metrics["shards"] and metrics["nodes"] == 2, metrics
    ours = {row["id"]: row for row in read_parquet(run_dir / "score" / "scores")}
    reference = {row["id"]: row for row in read_parquet(smoke_run.run_dir / "score" / "scores")}
    assert ours.keys() == reference.keys()
    for key, row in ours.items():
        assert row["ifd"] == pytest.approx(reference[key]["ifd"], abs=1e-4), key
    assert processes_mentioning(str(ray_dir)) == []  # both srun steps ended: neither node's Ray is left


def test_sbatch_config_error_fails_before_ray_starts(slurm: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, directory = slurm
    ray_dir = directory / "ray-bad"
    output = tmp_path / "job.out"
    job = _submit({**env, "UNIFIT_RAY_TMPDIR": str(ray_dir)}, output, "+experiment=no_such_experiment")
    log = _wait(env, job, output, 120)

    assert "no_such_experiment" in log and "driver exited" not in log, log[-3000:]
    assert _job_state(env, job)[0] == "FAILED"
    assert not ray_dir.exists()  # no `ray start` was spent on a run that could not compose
