"""Kill -9 the smoke pipeline inside each stage, rerun the same command, and prove nothing finished is redone.

One run directory and one cold completion cache; the command is killed (SIGKILL to every process of its session,
Ray's daemons and actors included) as soon as the run reaches each kill point, in pipeline order, then run once more to the end.
Checks: the run completes; shards, checkpoints, answers and model calls finished before each kill are reused,
not recomputed (counted); the datasets equal those of the uninterrupted reference run (`smoke_run`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, SmokeRun, fresh_completion_cache, smoke_command, smoke_env
from unifit.config import STAGES
from unifit.records import read_parquet
from unifit.stage import read_json
from unifit.training.sft import latest_checkpoint

UNCACHED = re.compile(r"llm.client: (\S+)(?: \S+)?: (\d+) of \d+ conversations not cached")  # "judge smollm2_135m: 6 of 6 ..."
POLL_S = 0.05


def _done(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / "manifest.json").exists()


def _files(run_dir: Path, pattern: str) -> dict[str, tuple[int, int]]:
    """Path -> (inode, mtime_ns): an atomic rewrite (temp file + rename) changes the inode, so reuse is provable."""
    return {str(p.relative_to(run_dir)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(run_dir.glob(pattern))}


@dataclass
class KillPoint:
    stage: str
    where: str
    reached: Callable[[Path, str], bool]  # (run_dir, this attempt's log so far) -> kill now?
    kept: str = ""  # glob of the files finished before the kill that the rerun must reuse untouched


KILL_POINTS = [
    KillPoint("generate", "mid-shard: the tree is written and the leaf questions are answered; their answers are in flight",
              lambda run, log: _calls(log, "generate") >= 3, "generate/tree.json"),
    KillPoint("train_scorer", "mid-epoch: the step-1 checkpoint is on storage, step 2 is running",
              lambda run, log: latest_checkpoint(run / "train_scorer/ray") is not None, ""),
    KillPoint("score", "mid-shards: some IFD shards are written, not all",
              lambda run, log: bool(list((run / "score/scores").glob("shard-*.parquet"))), "score/scores/shard-*.parquet"),
    KillPoint("evaluate", "after judging: both models answered and were judged (by probability); diversity/IFEval in flight",
              lambda run, log: (run / "evaluate/judge.json").exists(), "evaluate/judge.json"),
]


def _calls(log: str, desc: str) -> int:
    """Model calls with this description started so far (tree level, leaf questions, leaf answers, ...)."""
    return sum(1 for m in UNCACHED.finditer(log) if m.group(1) == desc)


@dataclass
class Attempt:
    log: str
    killed_at: str = ""
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)

    def uncached(self) -> list[tuple[str, int]]:
        return [(m.group(1), int(m.group(2))) for m in UNCACHED.finditer(self.log)]


def _session_members(sid: int) -> list[int]:
    """Live processes of session `sid`: Ray's workers move to process groups of their own, not sessions."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _kill_session(sid: int, timeout: float = 30) -> None:
    """SIGKILL every process of the run (driver, Ray daemons, actors), as a preempted node would."""
    deadline = time.time() + timeout
    while members := _session_members(sid):
        assert time.time() < deadline, f"processes {members} of the killed run survived SIGKILL"
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _attempt(run_dir: Path, env: dict[str, str], point: KillPoint | None, timeout: float = 600) -> Attempt:
    """Run the smoke command; with a kill point, SIGKILL its process group the moment the point is reached.

    stderr goes to a file, not a pipe: nobody reads a pipe while the run goes on, and once progress bars and Ray's
    warnings fill its 64 KiB buffer the run blocks on its next write and never reaches the kill point.
    """
    log_path = run_dir / "unifit.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    stderr_path = run_dir.parent / f"stderr-{point.stage if point else 'final'}.txt"
    command = smoke_command(run_dir, "train.checkpoint_every=1")  # not fingerprinted: same run as the reference
    with stderr_path.open("w") as stderr_file:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr_file, text=True,
                                start_new_session=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        log = log_path.read_text()[offset:] if log_path.exists() else ""
        if point is not None and not _done(run_dir, point.stage) and point.reached(run_dir, log):
            _kill_session(proc.pid)
            proc.wait()
            kept = _files(run_dir, point.kept) if point.kept else {}
            return Attempt(log_path.read_text()[offset:], killed_at=point.stage, kept=kept)
        time.sleep(POLL_S)
    log = log_path.read_text()[offset:] if log_path.exists() else ""
    stderr = stderr_path.read_text()
    if proc.poll() is None:
        _kill_session(proc.pid)
        pytest.fail(f"run did not finish within {timeout}s\nlog:\n{log[-3000:]}\nstderr:\n{stderr[-3000:]}")
    assert point is None, f"the run ended (exit {proc.returncode}) before reaching {point.stage} {point.where}:\n{stderr[-3000:]}"
    assert proc.returncode == 0, stderr[-4000:]
    return Attempt(log)


def _by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in rows}


@pytest.mark.slow
def test_killed_in_every_stage_resumes_without_redoing_finished_work(smoke_run: SmokeRun, tmp_path: Path, cache_dir: Path) -> None:
    assert smoke_run.result.returncode == 0, smoke_run.result.stderr[-3000:]
    run_dir = tmp_path / "run"
    completion_cache = fresh_completion_cache(tmp_path / "cache", cache_dir)
    env = smoke_env(completion_cache)
    killed = [_attempt(run_dir, env, point) for point in KILL_POINTS]
    final = _attempt(run_dir, env, None)
    attempts = [*killed, final]

    for stage in STAGES:
        assert _done(run_dir, stage), f"{stage} did not finish after the reruns"
    metrics = {stage: entry["metrics"] for stage, entry in read_json(run_dir / "timings.json")["stages"].items()}
    after = dict(zip([p.stage for p in KILL_POINTS], attempts[1:]))  # the attempt that resumed each killed stage

    # Generation: the tree is reused as it is (same inode, never rewritten); the leaf questions answered before the
    # kill come from the completion cache, so the rerun's first model call is the one that was in flight.
    assert killed[0].kept and killed[0].kept.items() <= _files(run_dir, KILL_POINTS[0].kept).items()
    assert after["generate"].uncached()[0] == killed[0].uncached()[-1]
    # Training: the rerun resumed from the step-1 checkpoint, not from step 0.
    assert "resuming from step 1" in after["train_scorer"].log
    assert read_json(run_dir / "train_scorer" / "metrics.json")["resumed_from_step"] == 1
    # IFD scoring: shards written before the kill are reused, only the rest computed.
    scored = killed[2].kept
    assert scored and scored.items() <= _files(run_dir, KILL_POINTS[2].kept).items()
    assert metrics["score"]["shards_reused"] == len(scored) and metrics["score"]["shards_computed"] == metrics["score"]["shards"] - len(scored)
    # Evaluation: the verdicts written before the kill are reused untouched; test questions are not asked again.
    assert killed[3].kept.items() <= _files(run_dir, KILL_POINTS[3].kept).items()
    resumed_eval = after["evaluate"].uncached()
    assert not [call for call in resumed_eval if call[0] == "judge"], resumed_eval

    # Model calls: the reruns computed what the uninterrupted run computed, plus only the calls in flight at a kill.
    reference_log = (smoke_run.run_dir / "unifit.log").read_text()
    uninterrupted = sum(n for _, n in Attempt(reference_log).uncached())
    computed = sum(n for attempt in attempts for _, n in attempt.uncached())
    in_flight = sum(attempt.uncached()[-1][1] for attempt in killed if attempt.uncached())
    assert uninterrupted <= computed <= uninterrupted + in_flight, (uninterrupted, computed, in_flight)

    # The datasets equal those of the uninterrupted run with the same seed.
    reference = smoke_run.run_dir
    for folder in ("generate/instances", "sample", "select"):
        ours, theirs = read_parquet(run_dir / folder), read_parquet(reference / folder)
        assert ours and [r["id"] for r in ours] == [r["id"] for r in theirs], folder
        assert [r["messages"] for r in ours] == [r["messages"] for r in theirs], folder
    ours, theirs = _by_id(read_parquet(run_dir / "score/scores")), _by_id(read_parquet(reference / "score/scores"))
    assert ours.keys() == theirs.keys()
    for key, row in ours.items():
        assert row["ifd"] == pytest.approx(theirs[key]["ifd"], abs=1e-4), key
    print(json.dumps({"kill_points": [f"{p.stage}: {p.where}" for p in KILL_POINTS], "uninterrupted_calls": uninterrupted,
                      "calls_with_kills": computed, "paid_twice": computed - uninterrupted}))
