#!/usr/bin/env bash
# Stops what scripts/slurm-up.sh started (slurmd, slurmctld, and munged if it started
# it), by their pid files. Jobs still running keep running (slurmstepd outlives slurmd,
# as on a real cluster); slurmctld keeps them in its state folder for the next start.
set -euo pipefail

DIR=${LAUFBAND_SLURM_DIR:-/var/spool/slurm-laufband}

# Is the process in pid file $2 alive and named $1? (A stale file's pid may have been
# reused by another program.)
alive() {
    local pid
    [ -s "$2" ] || return 1
    pid=$(cat "$2")
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ]
}

stop() {  # name pidfile: TERM, then KILL if it has not gone within 30 s
    local end=$((SECONDS + 30))
    if ! alive "$1" "$2"; then
        echo "slurm-down: $1 is not running" >&2
        return 0
    fi
    kill -TERM "$(cat "$2")" 2>/dev/null || true
    while alive "$1" "$2"; do
        if [ "$SECONDS" -ge "$end" ]; then kill -KILL "$(cat "$2")" 2>/dev/null || true; fi
        sleep 0.2
    done
    echo "slurm-down: stopped $1" >&2
}

# slurmd first: a slurmctld that stops first would mark the node down for nothing.
stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
if [ -e "$DIR/run/munged.ours" ]; then
    stop munged /run/munge/munged.pid
    rm -f "$DIR/run/munged.ours"
fi
