"""conf/cluster/*: every cluster config composes and validates; slurm/ray pools follow the GPUs that came up."""

from __future__ import annotations

import pytest

from conftest import CONF, compose_config


CLUSTERS = sorted(p.stem for p in (CONF / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_every_cluster_composes(cluster: str) -> None:
    cfg = compose_config([f"cluster={cluster}"])
    assert (cfg.cluster.address is None) == (cluster == "local")  # every cluster but local joins a running Ray
    assert cfg.cluster.use_gpu == (cfg.cluster.gpus_per_actor > 0)


def test_slurm_and_ray_pools_are_one_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFIT_CLUSTER_GPUS", "16")  # what launch/cluster_env.py exports for 2 x 8 GPUs
    monkeypatch.setenv("UNIFIT_CPUS_PER_ACTOR", "6")
    for name in ("slurm", "ray"):
        cluster = compose_config([f"cluster={name}"]).cluster
        assert (cluster.generation_actors, cluster.scoring_actors, cluster.train_workers) == (16, 16, 16)
        assert (cluster.cpus_per_actor, cluster.gpus_per_actor, cluster.address) == (6, 1, "auto")
    explicit = compose_config(["cluster=slurm", "cluster.scoring_actors=4"]).cluster
    assert (explicit.scoring_actors, explicit.generation_actors) == (4, 16)


def test_slurm_defaults_to_one_8_gpu_node_without_the_job_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIFIT_CLUSTER_GPUS", raising=False)
    monkeypatch.delenv("UNIFIT_CPUS_PER_ACTOR", raising=False)
    cluster = compose_config(["+experiment=cyber_500k"]).cluster
    assert (cluster.name, cluster.generation_actors, cluster.train_workers, cluster.cpus_per_actor) == ("slurm", 8, 8, 4)


def test_a_named_cluster_on_the_command_line_beats_the_sbatch_default() -> None:
    # slurm/unifit.sbatch appends cluster=slurm only when ARGS name no cluster, and the experiment's own
    # `override /cluster` loses to the command line: what the CI Slurm test relies on.
    assert compose_config(["+experiment=smoke", "cluster=slurm_cpu"]).cluster.use_gpu is False
    assert compose_config(["+experiment=demo", "cluster=slurm"]).cluster.name == "slurm"
