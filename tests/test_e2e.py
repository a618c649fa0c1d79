"""The smoke experiment end to end, the way a user runs it: `python -m unifit.launch +experiment=smoke`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unifit.config import STAGES

REPO = Path(__file__).resolve().parents[1]


def launch(run_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "unifit.launch", "+experiment=smoke", f"run_dir={run_dir}", *overrides]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_experiment_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "smoke"
    started = time.time()
    result = launch(run_dir)
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"run directory: {run_dir}" in result.stdout
    for stage in STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage
    timings = json.loads((run_dir / "timings.json").read_text())
    assert set(timings["stages"]) == set(STAGES)
    html = (run_dir / "report" / "report.html").read_text()
    assert html.count("<table") >= 3 and "Table 1" in html and "Pithy NE" in html
    images = re.findall(r"<img[^>]+src=['\"]([^'\"]+)['\"]", html)
    assert len(images) >= 4 and all((run_dir / "report" / src).is_file() for src in images)
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
    from datasets import load_dataset

    instances = load_dataset("parquet", data_files=str(run_dir / "generate" / "instances" / "*.parquet"), split="train")
    assert len(instances) > 0 and set(instances.column_names) >= {"id", "leaf_id", "concept_path", "messages", "source", "generator"}
    print(f"smoke run took {elapsed:.0f}s")

    # The same command again skips every finished stage.
    again = launch(run_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    log = (run_dir / "unifit.log").read_text()
    assert all(f"[{stage}] up to date, skipped" in log for stage in STAGES)


def test_bad_override_is_one_clear_line(tmp_path: Path) -> None:
    result = launch(tmp_path / "x", "select.ratio=1.5", timeout=120)
    assert result.returncode == 2
    assert "select.ratio" in result.stderr and "Traceback" not in result.stderr
