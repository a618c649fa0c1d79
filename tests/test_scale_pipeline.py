"""The pipeline at ~2K instances against the stand-in GPU server, the way bench/scale_bench.py runs it at scale.

One full run (`+experiment=cyber_500k` made local: five scopes, two turns, generation and judge through the
`openai` backend, IFD scoring and training on the 1×16 random model) is the reference. Then a copy of it loses
half of its generation shards and half of its IFD score shards, as interrupted runs would, and reruns generate,
score and select. Checked against counts made here from the parquet files and the stage manifests: every
instance scored exactly once, every sampled instance trained on (encoded or counted as dropped), models loaded
once per actor whatever the number of calls, and the resumed instances (ids in order), scores, sample and Pithy
set identical to the reference's.
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
LEAVES_PER_SHARD = 10  # 50 leaves: five generation shards, so a resume has shards to keep and shards to redo


def launch(run_dir: Path, url: str, key: str, ray_tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, KEY_ENV: key, "RAY_TMPDIR": str(ray_tmp), "WANDB_MODE": "disabled", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "unifit.launch", *overrides(INSTANCES, url, run_dir, train_steps=2, test_questions=8),
               "generate.self_instruct.enabled=false", f"generate.shard_size={LEAVES_PER_SHARD}",
               "variants=[{name: pithy, data: pithy, neftune: false}]", *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]


def interrupt(run_dir: Path, stage: str, outputs: str) -> list[Path]:
    """Make `stage` look killed half-way: no manifest, its in-progress marker, every other output shard gone."""
    manifest = json.loads((run_dir / stage / "manifest.json").read_text())
    (run_dir / stage / "manifest.json").unlink()
    (run_dir / stage / ".in_progress.json").write_text(json.dumps({"fingerprint": manifest["fingerprint"]}))
    shards = sorted((run_dir / stage / outputs).glob("shard-*.parquet"))
    assert len(shards) >= 4
    for shard in shards[1::2]:
        shard.unlink()
    return shards


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def column(path: Path, name: str) -> list:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    return [value for f in files for value in pq.read_table(f, columns=[name]).column(name).to_pylist()]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # nine stages in two runs on a 2-core CPU
def test_stand_in_pipeline_streams_and_resumes_without_losing_an_instance(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    ray_tmp = Path(tempfile.mkdtemp(prefix="usp", dir="/tmp"))
    reference = tmp_path / "reference"
    try:
        with StandinServer(key, answer_words=30) as server:  # short answers: the CPU scores and trains fewer tokens
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
            # the rows Ray Data built and training streamed hold each sampled instance once (packed several to a row)
            rows = column(reference / "train_scorer" / "rows", "ids")
            assert len(rows) < trained["examples"] == len({i for row in rows for i in row}) == sum(map(len, rows))
            assert {i for row in rows for i in row} <= set(sample)
            pithy = column(reference / "select" / "pithy.parquet", "id")
            finetuned = [i for row in column(reference / "finetune" / "rows" / "pithy", "ids") for i in row]
            assert sorted(finetuned) == sorted(pithy)  # short stand-in answers: none dropped

            # models loaded once per actor, however many calls: the endpoint never loads, the scorer once per actor
            generate = metrics(reference, "generate")
            assert generate["model_loads"] == generate["engine_starts"] == 0 and generate["models_served"] == 1
            score = metrics(reference, "score")
            assert 1 <= score["scorer_loads"] <= 2 < score["shards_computed"]  # cluster=local: scoring_actors=2
            evaluate = metrics(reference, "evaluate")  # hf answerers (base, pithy) on generation_actors=2; the judge an endpoint
            assert 1 <= evaluate["model_loads"] <= 2 * (evaluate["models_served"] - 1) < evaluate["completions_computed"]

            resumed = tmp_path / "resumed"
            shutil.copytree(reference, resumed, symlinks=True)
            raw = interrupt(resumed, "generate", "raw")
            for stale in (resumed / "generate" / "instances").glob("*.parquet"):
                stale.unlink()
            shutil.rmtree(resumed / "select")  # selected again from the resumed scores
            score_shards = interrupt(resumed, "score", "scores")
            result = launch(resumed, server.url, key, ray_tmp, "stages=[generate,score,select]")
            assert result.returncode == 0, result.stderr[-4000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    generated = metrics(resumed, "generate")
    assert generated["shards_generated"] == len(raw[1::2]) and generated["shards_resumed"] == len(raw) - len(raw[1::2])
    assert column(resumed / "generate" / "instances", "id") == instances  # none lost, none duplicated, same order
    scored_again = metrics(resumed, "score")
    assert scored_again["shards_computed"] == len(score_shards[1::2])
    assert scored_again["shards_reused"] == len(score_shards) - len(score_shards[1::2])
    ours = pq.read_table(resumed / "score" / "scores").sort_by("id").to_pylist()
    theirs = pq.read_table(reference / "score" / "scores").sort_by("id").to_pylist()
    assert json.dumps(ours) == json.dumps(theirs)  # same shards, same batches: bit-identical scores (NaN included)
    assert table(resumed / "select" / "pithy.parquet") == table(reference / "select" / "pithy.parquet")
    assert len(table(reference / "select" / "pithy.parquet")) == round(0.06 * len(instances))
