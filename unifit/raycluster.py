"""Start or join Ray once per process: a private local Ray on a laptop/CI, `address=auto` inside a cluster job."""

from __future__ import annotations

import logging
import os
import threading

from unifit.config import ClusterConfig

log = logging.getLogger(__name__)


_STARTING = threading.Lock()  # a stage's steps that run at once (threads) must not each start a Ray of their own


def ensure_ray(cluster: ClusterConfig) -> None:
    with _STARTING:
        _ensure_ray(cluster)


def _ensure_ray(cluster: ClusterConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a stray ~/.ray/auth_token would otherwise lock clients out
    if cluster.address:
        log.info("joining Ray cluster at %s", cluster.address)
        ray.init(address=cluster.address, log_to_driver=False)
        return
    ray.init(
        num_cpus=cluster.num_cpus, object_store_memory=int(cluster.object_store_memory_gb * (1 << 30)),
        include_dashboard=False, log_to_driver=False,
    )
    log.info("started local Ray: %s", ray.cluster_resources())


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def largest_node_cpus() -> float:
    """CPUs of the largest live node: the most one actor or worker can ask for and still be scheduled."""
    import ray

    return max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=0.0)


def cpus_per_train_worker(cluster: ClusterConfig) -> float:
    """CPUs each Ray Train worker asks for. Ray sets a worker's OMP threads to its CPU count, so a CPU run
    with the default 1 would train on one core of many. A worker lives on one node: never more than the
    largest node has, or it could not be scheduled at all."""
    import ray

    if cluster.cpus_per_train_worker is not None:
        return cluster.cpus_per_train_worker
    even_share = ray.cluster_resources().get("CPU", 1) // cluster.train_workers
    return max(1.0, float(int(min(even_share, largest_node_cpus()))))
