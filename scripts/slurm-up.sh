#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests in
# tests/integration/test_slurm.py (and CI): installs slurm-wlm and munge if missing,
# writes /etc/slurm/slurm.conf, starts munged, slurmctld and slurmd without systemd and
# waits until the node is idle. Running it again is fine: what runs stays up, and a
# changed configuration restarts the SLURM daemons.
#
#   eval "$(scripts/slurm-up.sh)"          # or: source <(scripts/slurm-up.sh)
#   scripts/slurm-down.sh                  # stops what this started
#
# The only line on stdout is the last one, `export LAUFBAND_TEST_SLURM=1`, so the
# caller's shell can take it over; everything else goes to stderr. Needs root (Debian's
# packages, /etc/slurm, daemons that run jobs as their submitter).
set -euo pipefail

exec 3>&1 1>&2   # fd 3: the caller's stdout, for the export line only
log() { echo "slurm-up: $*"; }
die() { echo "slurm-up: error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"

# shellcheck source=scripts/slurm-lib.sh
. "$(dirname "$0")/slurm-lib.sh"   # DIR (ours: state, logs, pid files), alive, stop
CONF=/etc/slurm/slurm.conf
MARK="# Written by laufband's scripts/slurm-up.sh (a single-node test cluster)."
DEADLINE=${LAUFBAND_SLURM_UP_TIMEOUT:-90}   # seconds for each wait below

# ---------------------------------------------------------------- packages
have_all() {
    command -v sbatch && command -v slurmctld && command -v slurmd && command -v munged
} >/dev/null
if ! have_all; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine's package lists may be stale or missing: update only then.
    apt-get install -y -q slurm-wlm munge \
        || { apt-get update -q && apt-get install -y -q slurm-wlm munge; }
    have_all || die "slurm-wlm and munge are installed, yet a command is missing"
fi

# ------------------------------------------------------------------ helpers
# Poll "$@" until it succeeds, for at most DEADLINE seconds.
wait_for() {
    local what=$1 end=$((SECONDS + DEADLINE))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.2
    done
    log "$what"
}

# Run a daemon with no file descriptors but stdin/out/err: munged keeps every
# descriptor it inherits, so one holding the pipe of `$(scripts/slurm-up.sh)` would
# keep the caller waiting for ever. Errors before it forks still reach our stderr.
daemon() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
        done
        exec "$@"
    ) </dev/null >/dev/null
}

# ------------------------------------------------------------ configuration
HOST=$(hostname -s)
# The memory slurmd sees (a job that asks for --mem must fit in it).
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" /etc/slurm

new=$(mktemp)
trap 'rm -f "$new"' EXIT
cat >"$new" <<EOF
$MARK
ClusterName=laufband
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups without systemd. pgid, not linuxproc: with linuxproc, processes that
# outlive the batch shell survive scancel.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# No slurmdbd: sacct says "accounting storage is disabled"; use scontrol show job.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# Jobs share the node by CPU; 8 CPUs whatever the machine has (config_overrides
# takes the line below as it is instead of draining a node that has fewer), so an
# array of 8 one-CPU jobs runs at once even on 2 cores.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
# Start jobs at once (the default batches submissions for up to ~3 s).
SchedulerParameters=batch_sched_delay=0
# scancel and the time limit: SIGTERM, then SIGKILL 10 s later.
KillWait=10
# Finished jobs stay visible to scontrol show job for 5 min.
MinJobAge=300
# A node that was down (daemons restarted) comes back when its slurmd registers.
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=8 RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

if [ -e "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: not overwriting a real" \
        "cluster's configuration (move it away to use this script)"
fi
if ! cmp -s "$new" "$CONF"; then
    # A changed configuration (another machine's memory, an edit of this script):
    # restart the SLURM daemons with it.
    stop slurmd "$DIR/run/slurmd.pid"
    stop slurmctld "$DIR/run/slurmctld.pid"
    install -m 0644 "$new" "$CONF"
    log "wrote $CONF"
fi

# -------------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
    log "created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
# /run/munge is normally made by systemd's tmpfiles; without systemd we make it.
mkdir -p /run/munge
chown munge:munge /run/munge
chmod 0755 /run/munge
if munge -n </dev/null >/dev/null 2>&1; then
    log "munged is running"
else
    # --force: a socket left by a munged that was killed would stop it otherwise.
    daemon runuser -u munge -- munged --force
    touch "$DIR/run/munged.ours"   # slurm-down.sh stops only a munged we started
    wait_for "munged is up" sh -c 'munge -n </dev/null' || die "munged did not start"
fi

# -------------------------------------------------------------------- slurm
if alive slurmctld "$DIR/run/slurmctld.pid"; then
    log "slurmctld is running"
else
    daemon slurmctld   # forks into the background and writes its pid file
    wait_for "slurmctld is up" scontrol ping \
        || die "slurmctld did not answer; see $DIR/log/slurmctld.log"
fi
slurmd_since=0
if alive slurmd "$DIR/run/slurmd.pid"; then
    log "slurmd is running"
else
    slurmd_since=$(date +%s)
    daemon slurmd
fi

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1; }
# Has the slurmd we started registered? A restarted slurmctld shows the node as it
# saved it (idle, say) before any slurmd answered.
registered() {
    local since
    since=$(scontrol show node "$HOST" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
    [ -n "$since" ] && [ "$since" != None ] \
        && [ "$(date -d "$since" +%s)" -ge $((slurmd_since - 1)) ]
}
node_idle() {
    registered || return 1
    case "$(node_state)" in
        idle | mixed | allocated) return 0 ;;
        # A node drained or marked down earlier (a slurmd that was stopped) is ours to
        # bring back; ReturnToService=2 does so only for a node down for not responding.
        *drain* | down) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;;
    esac
    return 1
}
wait_for "node $HOST is up" node_idle \
    || die "node $HOST is '$(node_state)', not idle; see $DIR/log/slurmd.log"

echo "export LAUFBAND_TEST_SLURM=1" >&3
