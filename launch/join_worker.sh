#!/usr/bin/env bash
# Join this machine to a UNIFIT Ray cluster started with launch/start_head.sh, in the foreground:
#
#   launch/join_worker.sh HEAD_IP:PORT [extra ray start args]
#
# Stop the node by ending this process (Ctrl-C, kill PID), never with `ray stop`. slurm/unifit.sbatch runs
# this script in an srun step on every node but the first.
# Environment: UNIFIT_RAY_TMPDIR (default /tmp/ray-unifit-PORT), UNIFIT_RAY_CPUS / UNIFIT_RAY_GPUS
# (default: detected), UNIFIT_RAY_START_ARGS, RAY_AUTH_MODE (default disabled; must match the head's).
set -euo pipefail
# shellcheck source=ray_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ray_env.sh"

if [[ $# -lt 1 || $1 != *:* ]]; then
    echo "usage: $0 HEAD_IP:PORT [ray start args]   (start_head.sh prints the address)" >&2
    exit 2
fi
address=$1
shift
port=${address##*:}
unifit_ray_start worker "$port" "${address%:*}" "${UNIFIT_RAY_TMPDIR:-/tmp/ray-unifit-$port}" "$@"
