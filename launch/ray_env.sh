# Sourced by launch/start_head.sh, launch/join_worker.sh and slurm/unifit.sbatch: the one place that decides
# how a UNIFIT Ray node is started, so a Slurm job and a hand-made VM cluster behave the same.
#
# Every cluster gets its own ports (from one base port) and its own --temp-dir, so two clusters on one
# host (two Slurm jobs sharing a node, or a job next to a user's laptop Ray) neither collide nor attach
# to each other. Nodes are always stopped by ending the `ray start --block` process that owns them,
# never with `ray stop` (which kills every Ray on the host).

# Token auth is enabled by a stray ~/.ray/auth_token unless the mode is explicit; clients would be refused.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# Compute nodes are often offline: no usage-stats reporting unless asked for.
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}

# A cluster's fixed ports are its GCS (BASE), client server (BASE+1) and dashboard (BASE+2), all on the
# head. Every per-node port is dynamic (0), including the dashboard agent's, which otherwise defaults to a
# fixed port that a second Ray on the same host would find taken.
unifit_node_port_args() {
    echo "--dashboard-agent-listen-port=0 --dashboard-agent-grpc-port=0 --metrics-export-port=0 --runtime-env-agent-port=0"
}

unifit_head_port_args() {  # BASE -> the head's flags
    local base=$1 client=""
    # Ray starts its client server (default port 10001) only where `ray[client]` (grpc) is installed, and
    # refuses the flag where it is not.
    python -c 'import grpc' 2>/dev/null && client="--ray-client-server-port=$((base + 1))"
    echo "--port=$base $client --dashboard-port=$((base + 2)) $(unifit_node_port_args)"
}

unifit_check_ports_free() {  # FIRST LAST: fail with a clear message if this host already uses one of them
    python - "$1" "$2" <<'PY'
import socket, sys
first, last = int(sys.argv[1]), int(sys.argv[2])
for port in range(first, last + 1):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed cluster's TIME_WAIT is no clash
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            sys.exit(f"port {port} is in use on {socket.gethostname()}: another Ray cluster or service owns it; "
                     "give this cluster another base port (UNIFIT_RAY_PORT)")
PY
}

unifit_cpus_here() {  # CPUs Ray may use on this node: override, else Slurm's allocation, else all cores
    echo "${UNIFIT_RAY_CPUS:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
}

# GPUs Ray may use on this node. Under Slurm only what the step was given counts: SLURM_GPUS_PER_TASK is
# empty with --gres/--gpus-per-node, so use SLURM_GPUS_ON_NODE, else the CUDA_VISIBLE_DEVICES Slurm sets
# for the step; a Slurm step without either got no GPUs (0, even on a GPU node). Outside Slurm:
# CUDA_VISIBLE_DEVICES if set, else nvidia-smi, else 0 (CPU node).
unifit_gpus_here() {
    local visible=${CUDA_VISIBLE_DEVICES-unset}
    if [[ -n ${UNIFIT_RAY_GPUS:-} ]]; then
        echo "$UNIFIT_RAY_GPUS"
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ $visible != unset && -n $visible && $visible != NoDevFiles ]]; then  # indices, UUIDs or MIG ids
        awk -F, '{print NF}' <<<"$visible"
    elif [[ -n ${SLURM_JOB_ID:-} || $visible != unset ]]; then
        echo 0
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Start this node's Ray in the foreground (`ray start --block`): ending this process (Ctrl-C, kill, or the
# end of its srun step) stops exactly this node. ROLE is head or worker; extra args go to `ray start`
# after ours (so they win), then $UNIFIT_RAY_START_ARGS.
unifit_ray_start() {  # ROLE BASE_PORT HEAD_IP TEMP_DIR [ray start args...]
    local role=$1 base=$2 head_ip=$3 temp_dir=$4
    shift 4
    local cpus gpus
    cpus=$(unifit_cpus_here)
    gpus=$(unifit_gpus_here)
    # A node with no GPUs for Ray must not let CUDA see any (an inherited CUDA_VISIBLE_DEVICES may name
    # another node's devices); with GPUs, the step's CUDA_VISIBLE_DEVICES (set by Slurm per node) stands.
    if [[ $gpus == 0 ]]; then
        export CUDA_VISIBLE_DEVICES=""
    fi
    mkdir -p "$temp_dir"
    echo "[${SLURMD_NODENAME:-$(hostname -s)}] ray $role: cpus=$cpus gpus=$gpus CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>} temp-dir=$temp_dir" >&2
    # shellcheck disable=SC2046,SC2086  # the port flags and UNIFIT_RAY_START_ARGS are word lists on purpose
    if [[ $role == head ]]; then
        unifit_check_ports_free "$base" "$((base + 2))" || return 1
        exec ray start --head --node-ip-address="$head_ip" $(unifit_head_port_args "$base") \
            --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$temp_dir" --block "$@" ${UNIFIT_RAY_START_ARGS:-}
    else
        exec ray start --address="$head_ip:$base" $(unifit_node_port_args) \
            --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$temp_dir" --block "$@" ${UNIFIT_RAY_START_ARGS:-}
    fi
}
