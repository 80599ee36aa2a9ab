#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on 127.0.0.1, for the SLURM tests of this workflow.
#
#   bash scripts/slurm-localhost.sh start    install what is missing, configure, start munged,
#                                            slurmctld and slurmd, wait until the node is idle
#   bash scripts/slurm-localhost.sh stop     cancel all jobs, stop the daemons this script started
#   bash scripts/slurm-localhost.sh status   list those daemons and show sinfo
#
# SLURM_ROOT (default /tmp/noisynn-slurm) holds the controller state, the spool, the logs and the
# list of started daemons; it is wiped on every start. Needs root and Debian's apt-get: no
# systemd, no cgroups and no accounting daemon. Without accounting `sacct` always fails, so
# Snakemake must use `--slurm-status-command squeue` (profiles/slurm-localhost does), or it
# hangs after the jobs have finished.
#
# Every job runs as root on this one machine: this is a test fixture, not a cluster.
set -euo pipefail

SLURM_ROOT=${SLURM_ROOT:-/tmp/noisynn-slurm}
DAEMONS=$SLURM_ROOT/daemons          # one "name pid starttime" line per daemon, in start order
LOGS=$SLURM_ROOT/log
CONF=/etc/slurm/slurm.conf
OWNER_MARK="# Written by noisynn scripts/slurm-localhost.sh; overwritten on every start."
PACKAGES=(slurmctld slurmd slurm-client munge)
PORTS=(6817 6818)                    # slurmctld, slurmd

say() { printf 'slurm-localhost: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

require_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts system daemons)"
}

# Start time of a live process in clock ticks since boot; fork sets it and exec keeps it, so
# together with the PID it names one process even after the PID has been reused. A zombie (a
# killed daemon not yet reaped by PID 1) counts as gone.
start_time_of() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }                  # drop "pid (comm) ", comm may hold spaces
  set -- $stat
  [ "$1" != Z ] || return 1
  echo "${20}"
}

is_ours() { # pid starttime: is this still the process we started?
  [ "$(start_time_of "$1" 2>/dev/null)" = "$2" ]
}

any_daemon_alive() {
  [ -s "$DAEMONS" ] || return 1
  local name pid born
  while read -r name pid born; do
    is_ours "$pid" "$born" && return 0
  done < "$DAEMONS"
  return 1
}

install_missing_packages() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "packages ${missing[*]} are missing and there is no apt-get"
  say "installing ${missing[*]}"
  # Package scripts must not start the daemons through /etc/init.d: we start them ourselves,
  # with our config. Docker-style images already ship a policy-rc.d that says so.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local rc=0
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         "${missing[@]}" >/dev/null; } || rc=$?
  [ "$own_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" -eq 0 ] || die "apt-get install ${missing[*]} failed (exit $rc)"
}

write_config() {
  if [ -e "$CONF" ] && ! grep -qxF "$OWNER_MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
  fi
  local host hw cpus mem
  host=$(hostname -s)
  # The node goes INVALID if it claims more CPUs or memory than slurmd finds, so ask slurmd.
  hw=$(slurmd -C | head -n 1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<< "$hw")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$hw")
  [ -n "$cpus" ] && [ -n "$mem" ] || die "cannot read CPUs/RealMemory from 'slurmd -C': $hw"
  if [ "$mem" -gt 4096 ]; then mem=$((mem - 1024)); else mem=$((mem * 3 / 4)); fi

  rm -rf "$SLURM_ROOT/state" "$SLURM_ROOT/spool" "$LOGS"   # no jobs or node state from last time
  mkdir -p "$SLURM_ROOT/state" "$SLURM_ROOT/spool" "$LOGS" "$(dirname "$CONF")"
  cat > "$CONF" <<EOF
$OWNER_MARK
ClusterName=noisynn
# Addresses are pinned to 127.0.0.1, so an unresolvable hostname does not matter.
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${PORTS[0]}
SlurmdPort=${PORTS[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# The default, /usr/bin/mail, is not installed; slurmctld logs an error for every start without this.
MailProg=/bin/true
# No systemd and no cgroup delegation here: track processes by /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# squeue (Snakemake's status command here) reports finished jobs for MinJobAge seconds.
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$SLURM_ROOT/state
SlurmdSpoolDir=$SLURM_ROOT/spool
SlurmctldPidFile=$SLURM_ROOT/slurmctld.pid
SlurmdPidFile=$SLURM_ROOT/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# A job that asks for no memory gets its CPUs' share of the node, not the whole node.
DefMemPerCPU=$((mem / cpus))
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

launch() { # name command...: run in the background, record it so that stop can find it
  local name=$1 pid born
  shift
  "$@" > "$LOGS/$name.out" 2>&1 &
  pid=$!
  born=$(start_time_of "$pid") || die "$name exited at once; see $LOGS/$name.out"
  echo "$name $pid $born" >> "$DAEMONS"
}

wait_until() { # seconds what command...: poll every 0.2 s
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" > /dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "gave up waiting for $what; last log lines:"
      tail -n 20 "$LOGS"/* >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

node_is_up() { sinfo -h -o '%t' | grep -qxE 'idle|mix|alloc'; }  # "idle*" = not responding

start() {
  require_root
  if any_daemon_alive; then
    die "already running (daemons listed in $DAEMONS); run '$0 stop' first"
  fi
  local name pid
  for name in munged slurmctld slurmd; do
    for pid in $(pgrep -x "$name"); do
      if start_time_of "$pid" > /dev/null; then
        die "a $name that this script did not start is running (pid $pid); stop it first"
      fi
    done
  done
  local port
  if command -v ss > /dev/null; then   # iproute2 is not in minimal images; slurmctld would fail anyway
    for port in "${PORTS[@]}"; do
      if ss -Hltn "sport = :$port" | grep -q .; then die "TCP port $port is already in use"; fi
    done
  fi

  local began
  began=$(date +%s.%N)
  install_missing_packages
  write_config
  : > "$DAEMONS"
  # From here on, any failure stops whatever did start (the exit status stays the failure's).
  trap 'say "start failed; stopping what was started"; stop' EXIT

  if [ ! -s /etc/munge/munge.key ]; then   # the munge package normally makes one
    mungekey --create --force
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  # setpriv execs munged in place (runuser would fork), so the recorded PID is munged's own.
  launch munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
  wait_until 10 "munged" sh -c 'munge -n | unmunge'

  launch slurmctld slurmctld -D -f "$CONF"
  launch slurmd slurmd -D -f "$CONF"
  wait_until 30 "the node to become idle" node_is_up

  trap - EXIT
  sinfo
  say "cluster up in $(awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s" \
      "(state in $SLURM_ROOT, config $CONF)"
}

stop_process() { # name pid starttime: SIGTERM, then SIGKILL after 10 s
  local name=$1 pid=$2 born=$3 i
  is_ours "$pid" "$born" || return 0
  kill -TERM "$pid" 2> /dev/null || true
  for i in $(seq 50); do
    is_ours "$pid" "$born" || { say "stopped $name ($pid)"; return 0; }
    sleep 0.2
  done
  kill -KILL "$pid" 2> /dev/null || true
  say "killed $name ($pid) after SIGTERM was ignored for 10 s"
}

stop() {
  if [ ! -s "$DAEMONS" ]; then
    say "nothing to stop"
    rm -f "$DAEMONS"
    remove_own_conf
    return 0
  fi
  # Cancel jobs while slurmctld still runs, so no job step outlives the daemons.
  if any_daemon_alive && timeout 5 squeue -h -o %A > "$SLURM_ROOT/jobs" 2> /dev/null \
     && [ -s "$SLURM_ROOT/jobs" ]; then
    say "cancelling jobs: $(tr '\n' ' ' < "$SLURM_ROOT/jobs")"
    timeout 5 scancel $(cat "$SLURM_ROOT/jobs") 2> /dev/null || true
    local deadline=$((SECONDS + 15))
    while [ "$SECONDS" -lt "$deadline" ] \
          && timeout 5 squeue -h -t PENDING,RUNNING,COMPLETING -o %A 2> /dev/null | grep -q .; do
      sleep 0.2
    done
  fi
  local name pid born
  tac "$DAEMONS" | while read -r name pid born; do
    stop_process "$name" "$pid" "$born"
  done
  rm -f "$DAEMONS" "$SLURM_ROOT/jobs"
  remove_own_conf
}

# Leave no slurm.conf of ours behind: with one present and no slurmctld answering, every SLURM
# client (and Snakemake, whose SLURM plugin asks `scontrol show config` at start) waits ~10 s.
remove_own_conf() {
  if [ -f "$CONF" ] && grep -qxF "$OWNER_MARK" "$CONF"; then
    rm -f "$CONF"
  fi
}

status() {
  if [ ! -s "$DAEMONS" ]; then
    echo "not running (no $DAEMONS)"
    return 3
  fi
  local name pid born dead=0
  while read -r name pid born; do
    if is_ours "$pid" "$born"; then echo "$name $pid running"; else echo "$name $pid gone"; dead=1; fi
  done < "$DAEMONS"
  [ "$dead" -eq 0 ] || return 3
  sinfo
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
