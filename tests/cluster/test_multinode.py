"""Sharded stage work on a simulated 2-node Ray cluster gives the same outputs as one process on one node.

`ray.cluster_utils.Cluster` starts a real head and a second raylet (1 CPU each) on this machine: actors
that each need 1 CPU must land on different nodes, as on a Slurm allocation. This module owns its own
cluster, so it shuts down whatever Ray the session had (the `ray_local` fixture) and restores it after.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import tiny_model_config
from unifit.config import BackendConfig, ClusterConfig, UnifitConfig
from unifit.llm.base import Completion, GenerationParams

CONVERSATIONS = [[{"role": "user", "content": f"Name one risk of misconfigured {topic}."}]
                 for topic in ("DNS", "PKI", "email relays", "BGP routes", "CDN caches", "TLS", "SPF", "DKIM")]
PARAMS = GenerationParams(max_new_tokens=6, temperature=0.8, seed=11)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[str]:
    """A 2-node Ray cluster under a fresh RAY_TMPDIR (so nothing else attaches to it); yields its address."""
    import ray
    from ray.cluster_utils import Cluster

    session_ray = ray.is_initialized()
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    ray.shutdown()
    tmp = Path(tempfile.mkdtemp(prefix="unifit-rc-", dir="/tmp"))  # short: Ray's socket paths live under it
    (tmp / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(tmp)
    node_args = dict(num_cpus=1, object_store_memory=300 << 20)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(node_args, include_dashboard=False))
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        if session_ray and saved_tmpdir:  # give later tests the session Ray that `ray_local` promised them
            ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False,
                     _temp_dir=str(Path(saved_tmpdir) / "ray"), log_to_driver=False)


def _in_process(cfg: UnifitConfig) -> list[Completion]:
    """The reference: one model in this process, fed the same batches the client forms for the actors."""
    from unifit.llm.hf import HFChatModel

    model = HFChatModel(cfg.model, cfg.cache_dir, batch_size=cfg.backend.batch_size)
    size = cfg.backend.batch_size
    return [c for start in range(0, len(CONVERSATIONS), size)
            for c in model.complete(CONVERSATIONS[start : start + size], PARAMS)]


def _actor_nodes(class_fragment: str) -> set[str]:
    """Node ids of every actor (alive or finished) whose class name contains `class_fragment`, from the GCS.

    `ray.util.state.list_actors` would say the same but needs the dashboard (ray[default]); the GCS actor
    table is what it reads.
    """
    import ray._private.state

    return {info["Address"]["NodeID"] for info in ray._private.state.actors().values()
            if class_fragment in info["ActorClassName"]}


def test_generation_sharded_over_two_nodes_matches_one_process(two_nodes: str, cache_dir: Path) -> None:
    import ray

    from unifit.llm.client import ModelClients

    cfg = UnifitConfig(model=tiny_model_config("llama"), cache_dir=str(cache_dir),
                       backend=BackendConfig(batch_size=2, cache=False),
                       cluster=ClusterConfig(address=two_nodes, generation_actors=2, cpus_per_actor=1))
    clients = ModelClients(cfg.cluster, cfg.cache_dir)
    sharded = clients.connect(cfg.model, cfg.backend).complete(CONVERSATIONS, PARAMS)

    assert ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) == 2  # joined the cluster, not a private Ray
    actor_nodes = _actor_nodes("ModelActor")
    clients.close()
    assert len(actor_nodes) == 2, f"generation actors ran on {actor_nodes}; expected both nodes"

    reference = _in_process(cfg)
    assert [c.text for c in sharded] == [c.text for c in reference]
    assert [c.num_output_tokens for c in sharded] == [c.num_output_tokens for c in reference]
    assert all(c.finish_reason != "error" for c in sharded)


def test_ifd_scoring_sharded_over_two_nodes_matches_one_process(two_nodes: str, cache_dir: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unifit.models import resolve_model_dir
    from unifit.raycluster import ensure_ray
    from unifit.records import write_parquet
    from unifit.selection.ifd import score_conversations
    from unifit.selection.score import score_sharded

    model_dir = resolve_model_dir(tiny_model_config("llama"), cache_dir)
    rows = [{"id": f"i{n}", "leaf_id": f"leaf{n % 3}", "concept_path": ["cybersecurity", f"leaf{n % 3}"],
             "messages": [{"role": "user", "content": f"Why does {topic} matter?"},
                          {"role": "assistant", "content": f"Because {topic} is part of how the internet stays trustworthy."}]}
            for n, topic in enumerate(("DNS", "PKI", "SPF", "DKIM", "BGP", "TLS"))]
    ensure_ray(ClusterConfig(address=two_nodes))
    write_parquet(rows, tmp_path / "instances.parquet")
    counts = score_sharded(tmp_path / "instances.parquet", tmp_path / "scores", model_dir=model_dir, actors=2, cpus_per_actor=1, gpus_per_actor=0,
                           dtype="float32", max_length=512, max_tokens_per_batch=256, shard_size=2)

    placement = {key: counts[key] for key in ("shards", "shards_computed", "shards_reused", "nodes")}
    assert placement == {"shards": 3, "shards_computed": 3, "shards_reused": 0, "nodes": 2}
    assert 0 < counts["padding_efficiency"] <= 1
    assert len(_actor_nodes("ShardScorer")) == 2, "scoring actors did not use both nodes"
    sharded = {row["id"]: row for row in pq.read_table(tmp_path / "scores").to_pylist()}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reference = score_conversations(model, tokenizer, [row["messages"] for row in rows], max_length=512)
    for row, expected in zip(rows, reference):
        got = sharded[row["id"]]
        assert got["n_answer_tokens"] == expected["n_answer_tokens"] and not got["truncated"]
        for key in ("cond_loss", "direct_loss", "ifd"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4), (row["id"], key)


def test_a_train_worker_never_asks_for_more_cpus_than_one_node_has(two_nodes: str) -> None:
    from unifit.raycluster import cpus_per_train_worker, ensure_ray

    ensure_ray(ClusterConfig(address=two_nodes))
    # 2 CPUs in the cluster but 1 per node: a single worker asking for 2 could never be scheduled.
    assert cpus_per_train_worker(ClusterConfig(address=two_nodes, train_workers=1)) == 1.0
    assert cpus_per_train_worker(ClusterConfig(address=two_nodes, train_workers=2)) == 1.0
    assert cpus_per_train_worker(ClusterConfig(address=two_nodes, train_workers=1, cpus_per_train_worker=0.5)) == 0.5
