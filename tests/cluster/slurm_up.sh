#!/usr/bin/env bash
# A throwaway single-node Slurm (munged + slurmctld + slurmd) under DIR, for tests and for trying the
# sbatch template on one machine. Needs root and Debian's `slurm-wlm munge` packages.
#
#   tests/cluster/slurm_up.sh up DIR     # start; prints `export SLURM_CONF=DIR/slurm.conf`
#   tests/cluster/slurm_up.sh down DIR   # stop the three daemons it started (by their pid files)
#
# Everything private lives in DIR: munge key and socket, ports picked free at start, state, spool, logs,
# pid files. Nothing in /etc is read or changed, so it runs next to a real Slurm or another copy of itself.
set -euo pipefail

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(realpath -m "$2")

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
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    exit 0
fi
[[ $action == up ]] || usage

for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || PATH=$PATH:/usr/sbin
    command -v "$tool" >/dev/null || { echo "$0: $tool not found: apt-get install -y slurm-wlm munge" >&2; exit 3; }
done
[[ $(id -u) -eq 0 ]] || { echo "$0: must run as root (slurmd launches jobs, munged runs as user munge)" >&2; exit 3; }

host=$(hostname -s)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ctld_port=$(free_port)
slurmd_port=$(free_port)
while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
total_mb=$(free -m | awk '/^Mem:/ {print $2}')
real_memory=$(( total_mb / 2 ))  # must not exceed what slurmd measures, or the node is drained

mkdir -p "$dir"/{munge,state,spool}
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
SlurmctldHost=$host(127.0.0.1)
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
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=2 RealMemory=$real_memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF" -N "$host"
for _ in $(seq 300); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    [[ $state == idle ]] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.1
done
echo "$0: node $host not idle after 30 s (state: ${state:-unknown}); see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
