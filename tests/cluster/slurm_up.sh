#!/usr/bin/env bash
# A throwaway Slurm (munged + slurmctld + one slurmd per node) under DIR, for tests and for trying the
# sbatch template on one machine. Needs root and Debian's `slurm-wlm munge` packages.
#
#   tests/cluster/slurm_up.sh up DIR [NODES]   # start NODES nodes (default 1); prints `export SLURM_CONF=...`
#   tests/cluster/slurm_up.sh down DIR         # stop the daemons it started (by their pid files), drop the namespaces
#
# Node 1 is this host. Node 2 is a second slurmd in a network namespace of its own, joined to the host by a
# veth pair (10.213.X.0/24): its own address and ports, so srun, Ray's `ray start` and every connection
# between the nodes go over a real network interface, as between machines. The file system stays shared,
# as a cluster's shared file system is.
#
# Everything private lives in DIR: munge key and socket, ports picked free at start, state, spool, logs,
# pid files. Nothing in /etc is read or changed, so it runs next to a real Slurm or another copy of itself.
set -euo pipefail

usage() { echo "usage: $0 up DIR [NODES] | down DIR" >&2; exit 2; }
[[ $# -eq 2 || ($# -eq 3 && $1 == up) ]] || usage
action=$1
dir=$(realpath -m "$2")
nodes=${3:-1}
[[ $nodes == 1 || $nodes == 2 ]] || { echo "$0: NODES must be 1 or 2, got '$nodes'" >&2; exit 2; }

stop_pidfile() {  # stop the daemon named in a pid file, waiting up to 10 s; never by process name
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

if [[ $action == down ]]; then
    for pidfile in "$dir"/slurmd-*.pid; do stop_pidfile "$pidfile"; done
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    if [[ -s $dir/netns ]]; then  # deleting a namespace deletes its end of the veth pair, and so the pair
        while read -r namespace; do ip netns delete "$namespace" 2>/dev/null || true; done <"$dir/netns"
        rm -f "$dir/netns"
    fi
    exit 0
fi
[[ $action == up ]] || usage

for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || PATH=$PATH:/usr/sbin
    command -v "$tool" >/dev/null || { echo "$0: $tool not found: apt-get install -y slurm-wlm munge" >&2; exit 3; }
done
[[ $(id -u) -eq 0 ]] || { echo "$0: must run as root (slurmd launches jobs, munged runs as user munge)" >&2; exit 3; }

host=$(hostname -s)
mkdir -p "$dir"/{munge,state}
node_names=("$host")
node_addrs=(127.0.0.1)
ctld_addr=127.0.0.1
namespace=
if ((nodes > 1)); then
    command -v ip >/dev/null || { echo "$0: a multi-node Slurm needs iproute2 (ip netns): apt-get install -y iproute2" >&2; exit 3; }
    # One /24 per copy of this script, picked among those no interface uses yet.
    for _ in $(seq 50); do
        subnet=10.213.$((RANDOM % 250 + 1))
        ip -4 -o addr show | grep -q " $subnet\." || break
    done
    tag=$(printf '%04x' $((RANDOM * 2 + RANDOM % 2)))
    ctld_addr=$subnet.1
    namespace=unifit-$tag-n2
    ip netns add "$namespace"
    echo "$namespace" >"$dir/netns"
    ip link add "uf$tag-h" type veth peer name "uf$tag-n"
    ip link set "uf$tag-n" netns "$namespace"
    ip addr add "$ctld_addr/24" dev "uf$tag-h"
    ip link set "uf$tag-h" up
    ip -n "$namespace" addr add "$subnet.2/24" dev "uf$tag-n"
    ip -n "$namespace" link set lo up
    ip -n "$namespace" link set "uf$tag-n" up
    ip -n "$namespace" route add default via "$ctld_addr"  # the host's own addresses (Ray's head) via the veth
    node_names=("$host" "$host-n2")
    node_addrs=("$ctld_addr" "$subnet.2")
fi
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ctld_port=$(free_port)
slurmd_port=$(free_port)
while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
total_mb=$(free -m | awk '/^Mem:/ {print $2}')
real_memory=$(( total_mb / 2 ))  # must not exceed what slurmd measures, or the node is drained

chmod 755 "$dir"  # munged (user munge) must reach DIR/munge; its ancestors must be traversable too
chown munge:munge "$dir/munge"
chmod 755 "$dir/munge"  # clients need execute permission on the socket directory
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
socket=$dir/munge/munge.socket
runuser -u munge -- munged --key-file="$dir/munge/munge.key" --socket="$socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

cat > "$dir/slurm.conf" <<CONF
ClusterName=unifit
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
$(for i in "${!node_names[@]}"; do
    echo "NodeName=${node_names[i]} NodeAddr=${node_addrs[i]} CPUs=2 RealMemory=$real_memory State=UNKNOWN"
done)
PartitionName=debug Nodes=$(IFS=,; echo "${node_names[*]}") Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF" -N "$host"
if [[ -n $namespace ]]; then  # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree slurmd reads
    mkdir -p "$dir/spool-${node_names[1]}"
    nsenter --net="/run/netns/$namespace" slurmd -f "$SLURM_CONF" -N "${node_names[1]}"
fi
for _ in $(seq 300); do
    states=$(sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ')
    [[ $states == "idle " ]] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.1
done
echo "$0: nodes ${node_names[*]} not idle after 30 s (states: ${states:-unknown}); see $dir/slurmctld.log and $dir/slurmd-*.log" >&2
exit 1
