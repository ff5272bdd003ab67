# Shared by slurm-up.sh and slurm-down.sh (sourced; each defines log()).

# State, spool, logs and pid files in one folder of our own, so slurm-down.sh finds
# everything and a real cluster's folders are never touched.
DIR=${LAUFBAND_SLURM_DIR:-/var/spool/slurm-laufband}
MUNGE_PID=/run/munge/munged.pid   # munged's default

# Is the process in pid file $2 alive and named $1? (A stale file's pid may have been
# reused by another program.)
alive() {
    local pid
    pid=$(cat "$2" 2>/dev/null) || return 1   # no file (or it went away just now)
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ]
}

# Stop the process named $1 of pid file $2: SIGTERM, then SIGKILL if it is still there
# after 30 s. Nothing to do if it does not run.
stop() {
    local pid end=$((SECONDS + 30))
    alive "$1" "$2" || return 0
    pid=$(cat "$2")
    kill -TERM "$pid" 2>/dev/null || true
    while [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]; do
        if [ "$SECONDS" -ge "$end" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
        sleep 0.2
    done
    log "stopped $1"
}
