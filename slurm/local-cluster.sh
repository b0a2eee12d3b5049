#!/usr/bin/env bash
# Start a real single-node SLURM (Debian 22.05 packages: no systemd, daemons started by hand), as root.
# Idempotent: when munged, slurmctld and slurmd are up with the same slurm.conf it only checks (< 0.2 s).
set -euo pipefail
die() { echo "local-cluster: $*" >&2; exit 1; }
running() { pgrep -x "$1" >/dev/null; }  # only looks; never signals by name
is_root() { [[ $(id -u) == 0 ]]; }
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf
MEM=$(( $(free -m | awk '/^Mem:/ {print $2}') - 1000 ))  # leave ~1 GB to the OS and daemons

# 1. Packages; `apt-get update` only when the plain install fails.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  is_root || die "SLURM is not installed and we are not root to apt-get it"
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null; } ||
    die "apt-get install ${pkgs[*]} failed"
fi

# 2. munge key readable only by munge (the Debian package makes one at install; else 1024 random bytes).
if is_root && [[ ! -s /etc/munge/munge.key ]]; then
  install -d -o munge -g munge -m 700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi

# 3. slurm.conf for this node; rewritten (and the SLURM daemons stopped, to restart) only when it changes.
read -r -d '' WANT <<EOF || true
# Written by slurm/local-cluster.sh: single-node cluster for the oplora pipeline.
ClusterName=oplora
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
MinJobAge=3600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if is_root && [[ ! -f $CONF || "$(cat "$CONF")" != "$WANT" ]]; then
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  printf '%s\n' "$WANT" > "$CONF"
  for d in slurmctld slurmd; do  # by pid file; running jobs survive the restart
    if [[ -s /run/$d.pid ]] && kill "$(cat /run/$d.pid)" 2>/dev/null; then
      for _ in $(seq 50); do running $d || break; sleep 0.2; done
    fi
  done
fi

# 4. Daemons (each forks into the background); retried while waiting, in case one was still exiting.
start_daemons() {
  if ! is_root; then running slurmctld && running slurmd || die "SLURM is down; run this script as root"; return; fi
  if ! running munged; then  # as the munge user (there is no sudo)
    install -d -o munge -g munge -m 755 /run/munge && install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged 2>/dev/null || su -s /bin/sh munge -c munged || die "munged failed to start"
  fi
  running slurmctld || slurmctld || die "slurmctld failed to start; see /var/log/slurm/slurmctld.log"
  running slurmd || slurmd || die "slurmd failed to start; see /var/log/slurm/slurmd.log"
}

# 5. Wait for the node to take work: resume it when down/drained, make slurmd re-register when not responding.
SECONDS=0
state=""
while (( SECONDS < 60 )); do
  start_daemons
  state=$(timeout 5 sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1 || true)
  case $state in
    idle|mix|alloc|comp) echo "local-cluster: SLURM up on $HOST ($(nproc) CPUs, $MEM MB, node $state)"; exit 0 ;;
    down*|drain*|drng*|fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    *\*) (( ${asked:-0} )) || { asked=1; scontrol reconfigure >/dev/null 2>&1 || true; } ;;
  esac
  sleep 1
done
die "node $HOST not ready after 60 s (state '${state:-no answer}'); see /var/log/slurm/"
