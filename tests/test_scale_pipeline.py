"""The pipeline at ~2K instances against the stand-in GPU server, the way bench/scale_bench.py runs it at scale.

One full run (`+experiment=cyber_500k` made local: five scopes, two turns, generation and judge through the
`openai` backend, IFD scoring and training on the 1×16 random model) is the reference. Then a copy of it
loses half of its IFD score shards as an interrupted run would, and reruns score and select. Checked against
counts made here from the parquet files: every instance scored exactly once, every sampled instance trained
on (encoded or counted as dropped), the resumed scores and the Pithy set identical to the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from standin_server import StandinServer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from scale_bench import KEY_ENV, overrides  # noqa: E402

INSTANCES = 2000


def launch(run_dir: Path, url: str, key: str, ray_tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, KEY_ENV: key, "RAY_TMPDIR": str(ray_tmp), "WANDB_MODE": "disabled", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "unifit.launch", *overrides(INSTANCES, url, run_dir, train_steps=2, test_questions=8),
               "generate.self_instruct.enabled=false", "variants=[{name: pithy, data: pithy, neftune: false}]", *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def column(path: Path, name: str) -> list:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    return [value for f in files for value in pq.read_table(f, columns=[name]).column(name).to_pylist()]


@pytest.mark.slow
def test_stand_in_pipeline_streams_and_resumes_without_losing_an_instance(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    ray_tmp = Path(tempfile.mkdtemp(prefix="usp", dir="/tmp"))
    reference = tmp_path / "reference"
    try:
        with StandinServer(key) as server:
            result = launch(reference, server.url, key, ray_tmp)
            assert result.returncode == 0, result.stderr[-4000:]
            assert server.unauthorized == 0 and server.requests > INSTANCES
            kinds = server.script.kinds
            assert {"concepts", "question_list", "answer:leaf", "followup_question", "answer:followup", "test_question",
                    "judge", "diversity"} <= set(kinds), kinds

            instances = column(reference / "generate" / "instances", "id")
            assert 0.95 * INSTANCES <= len(instances) <= INSTANCES  # near-duplicate removal kept almost all
            assert len(set(instances)) == len(instances)
            scored = column(reference / "score" / "scores", "id")
            assert Counter(scored) == Counter(instances)  # each instance scored once, none invented

            sample = column(reference / "sample" / "sample.parquet", "id")
            trained = json.loads((reference / "train_scorer" / "metrics.json").read_text())
            assert trained["examples"] + trained["dropped_no_answer"] == len(sample)

            resumed = tmp_path / "resumed"
            shutil.copytree(reference, resumed, symlinks=True)
            manifest = json.loads((resumed / "score" / "manifest.json").read_text())
            (resumed / "score" / "manifest.json").unlink()
            (resumed / "score" / ".in_progress.json").write_text(json.dumps({"fingerprint": manifest["fingerprint"]}))
            shards = sorted((resumed / "score" / "scores").glob("shard-*.parquet"))
            assert len(shards) >= 4
            for shard in shards[1::2]:
                shard.unlink()
            result = launch(resumed, server.url, key, ray_tmp, "stages=[score,select]")
            assert result.returncode == 0, result.stderr[-4000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    metrics = json.loads((resumed / "score" / "manifest.json").read_text())["metrics"]
    assert metrics["shards_computed"] == len(shards[1::2]) and metrics["shards_reused"] == len(shards) - len(shards[1::2])
    ours = pq.read_table(resumed / "score" / "scores").sort_by("id").to_pylist()
    theirs = pq.read_table(reference / "score" / "scores").sort_by("id").to_pylist()
    assert json.dumps(ours) == json.dumps(theirs)  # same shards, same batches: bit-identical scores (NaN included)
    assert column(resumed / "select" / "pithy.parquet", "id") == column(reference / "select" / "pithy.parquet", "id")
