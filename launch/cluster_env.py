"""Wait until the Ray cluster at $RAY_ADDRESS has --nodes alive nodes, then print its size as shell exports.

    env_lines=$(python launch/cluster_env.py --nodes 4 --timeout 600) && eval "$env_lines"

`conf/cluster/slurm.yaml` and `conf/cluster/ray.yaml` size their actor pools from these variables, so the
pools match the GPUs that actually joined, not the ones that were asked for. slurm/unifit.sbatch and
launch/run_driver.sh (the entrypoint of launch/submit.sh) call it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time


def process_running(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by the job script) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def port_open(address: str) -> bool:
    """Whether HOST:PORT (optionally with a scheme) accepts TCP connections yet."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def wait_for_nodes(address: str, nodes: int, timeout: float, watch: list[int]) -> tuple[int, dict[str, float]]:
    """Connect (retrying while the head starts) and poll until `nodes` nodes are alive; (alive, total resources)."""
    import ray

    deadline = time.monotonic() + timeout
    alive, last_error = 0, "not connected yet"
    while time.monotonic() < deadline:
        dead = [pid for pid in watch if not process_running(pid)]
        if dead:
            sys.exit(f"cluster_env: the `ray start` process(es) {dead} ended before the cluster was up; "
                     "their error is in the job output above")
        if not ray.is_initialized():
            if not port_open(address):  # ray.init would spend a minute retrying a head that is not up yet
                time.sleep(1)
                continue
            try:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, TimeoutError) as error:
                last_error = str(error).splitlines()[0] if str(error) else type(error).__name__
                time.sleep(2)
                continue
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        if alive >= nodes:
            resources = dict(ray.cluster_resources())
            ray.shutdown()
            return alive, resources
        time.sleep(1)
    sys.exit(f"cluster_env: Ray cluster at {address} has {alive} of {nodes} nodes after {timeout:.0f}s "
             f"(last connection error: {last_error}); check that every node's `ray start` reached the head "
             "(firewall, UNIFIT_RAY_HEAD_IP) or raise the timeout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1, help="alive nodes to wait for")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up with an error")
    parser.add_argument("--watch-pid", type=int, action="append", default=[],
                        help="fail at once when this process (a `ray start` srun step) ends; repeatable")
    args = parser.parse_args(argv)
    address = os.environ.get("RAY_ADDRESS", "")
    if not address:
        sys.exit("cluster_env: RAY_ADDRESS is not set; export the head's address (HOST:PORT)")
    alive, resources = wait_for_nodes(address, args.nodes, args.timeout, args.watch_pid)
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    # An actor gets half of the CPUs per GPU (at most 8): the other half feeds Ray Data's tasks and the driver.
    cpus_per_actor = max(1, min(8, cpus // max(gpus, 1) // 2))
    print(f"cluster_env: {alive} node(s) up: {cpus} CPUs, {gpus} GPUs", file=sys.stderr)
    if gpus == 0:
        print("cluster_env: no GPUs here; cluster=slurm and cluster=ray size pools per GPU, so on CPU nodes use "
              "cluster=slurm_cpu (or set cluster.generation_actors etc.)", file=sys.stderr)
    print(f"export UNIFIT_CLUSTER_NODES={alive} UNIFIT_CLUSTER_CPUS={cpus} UNIFIT_CLUSTER_GPUS={gpus} "
          f"UNIFIT_CPUS_PER_ACTOR={cpus_per_actor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
