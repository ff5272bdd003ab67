#!/usr/bin/env bash
# Stops what scripts/slurm-up.sh started (slurmd, slurmctld, and munged if it started
# it), by their pid files. Jobs still running keep running (slurmstepd outlives slurmd,
# as on a real cluster); slurmctld keeps them in its state folder for the next start.
set -euo pipefail

log() { echo "slurm-down: $*" >&2; }
# shellcheck source=scripts/slurm-lib.sh
. "$(dirname "$0")/slurm-lib.sh"   # DIR, MUNGE_PID, alive, stop

# slurmd first: a slurmctld that stops first would mark the node down for nothing.
stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
if [ -e "$DIR/run/munged.ours" ]; then
    stop munged "$MUNGE_PID"
    rm -f "$DIR/run/munged.ours"
fi
