"""Start or join Ray once per process: a private local Ray on a laptop/CI, `address=auto` inside a cluster job."""

from __future__ import annotations

import logging
import os

from unifit.config import ClusterConfig

log = logging.getLogger(__name__)


def ensure_ray(cluster: ClusterConfig) -> None:
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
