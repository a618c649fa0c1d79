"""The smoke experiment end to end, the way a user runs it: `python -m unifit.launch +experiment=smoke`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from unifit.config import STAGES

from conftest import REPO, SmokeRun, smoke_command, smoke_env


@pytest.mark.slow
def test_smoke_experiment_end_to_end(smoke_run: SmokeRun) -> None:
    run_dir, result = smoke_run.run_dir, smoke_run.result
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
    print(f"smoke run took {smoke_run.seconds:.0f}s (cold completion cache)")

    # The same command again skips every finished stage.
    again = subprocess.run(smoke_command(run_dir), cwd=REPO, env=smoke_env(smoke_run.completion_cache),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    log = (run_dir / "unifit.log").read_text()
    assert all(f"[{stage}] up to date, skipped" in log for stage in STAGES)


def test_bad_override_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(smoke_command(tmp_path / "x", "select.ratio=1.5"), cwd=REPO, env=smoke_env(tmp_path / "cache"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "select.ratio" in result.stderr and "Traceback" not in result.stderr
