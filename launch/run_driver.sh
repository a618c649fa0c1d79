#!/usr/bin/env bash
# The entrypoint of a Ray job submitted by launch/submit.sh (it runs on the head, where Ray exports
# RAY_ADDRESS): size the actor pools from the live cluster (conf/cluster/ray.yaml reads UNIFIT_CLUSTER_GPUS
# and UNIFIT_CPUS_PER_ACTOR), then run the pipeline with the given Hydra overrides.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
env_lines=$(python launch/cluster_env.py --nodes 1 --timeout 120)
eval "$env_lines"
exec python -m unifit.launch "$@"
