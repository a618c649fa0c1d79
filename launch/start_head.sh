#!/usr/bin/env bash
# Start the head of a UNIFIT Ray cluster outside Slurm (a pool of VMs, bare metal), in the foreground:
#
#   UNIFIT_RAY_PORT=6379 launch/start_head.sh          # on the head machine (tmux, nohup or a systemd unit)
#   launch/join_worker.sh HEAD_IP:6379                 # on every other machine
#   launch/submit.sh +experiment=cyber_500k             # from your checkout (see the address printed below)
#
# Stop the node by ending this process (Ctrl-C, kill PID), never with `ray stop`, which kills every Ray on
# the host. Extra arguments go to `ray start`. slurm/unifit.sbatch runs this very script in an srun step.
#
# Environment: UNIFIT_RAY_PORT (GCS port, default 6379; the next 2 ports are this cluster's too: client
# server and dashboard = PORT+2), UNIFIT_RAY_TMPDIR (default /tmp/ray-unifit-PORT: one per cluster),
# UNIFIT_RAY_HEAD_IP (default the address Ray picks), UNIFIT_RAY_CPUS / UNIFIT_RAY_GPUS (default: detected),
# UNIFIT_RAY_DASHBOARD (default 1: the dashboard is the job server launch/submit.sh talks to, and needs
# `ray[default]`; 0 for a cluster no job is submitted to, as slurm/unifit.sbatch does),
# UNIFIT_RAY_DASHBOARD_HOST (default 127.0.0.1: job submission runs code, so reach it through
# `ssh -L`, or open it on a trusted network only), UNIFIT_RAY_START_ARGS, RAY_AUTH_MODE (default disabled).
set -euo pipefail
# shellcheck source=ray_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ray_env.sh"

case ${UNIFIT_RAY_DASHBOARD:-1} in
    1)
        # Without ray[default] Ray would start a minimal dashboard without a job server, silently: refuse now
        # rather than let every `ray job submit` fail later.
        if ! python -c 'import ray.dashboard.optional_deps' 2>/dev/null; then
            echo "start_head.sh: error: the dashboard (the job server of launch/submit.sh) needs ray[default] on the head:" \
                 "pip install \"ray[default]==$(python -c 'import ray; print(ray.__version__)')\"," \
                 "or start a head no job is submitted to with UNIFIT_RAY_DASHBOARD=0" >&2
            exit 2
        fi
        dashboard=true ;;
    0) dashboard=false ;;
    *) echo "start_head.sh: error: UNIFIT_RAY_DASHBOARD must be 1 or 0, got '$UNIFIT_RAY_DASHBOARD'" >&2; exit 2 ;;
esac

port=${UNIFIT_RAY_PORT:-6379}
head_ip=${UNIFIT_RAY_HEAD_IP:-$(python -c 'from ray.util import get_node_ip_address; print(get_node_ip_address())')}
temp_dir=${UNIFIT_RAY_TMPDIR:-/tmp/ray-unifit-$port}
dashboard_host=${UNIFIT_RAY_DASHBOARD_HOST:-127.0.0.1}
echo "ray head: workers join with: launch/join_worker.sh $head_ip:$port" >&2
if [[ $dashboard == true ]]; then
    echo "ray head: submit jobs with: RAY_ADDRESS=http://$dashboard_host:$((port + 2)) launch/submit.sh ARGS" >&2
fi
unifit_ray_start head "$port" "$head_ip" "$temp_dir" --include-dashboard="$dashboard" --dashboard-host="$dashboard_host" "$@"
