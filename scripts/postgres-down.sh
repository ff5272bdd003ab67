#!/usr/bin/env bash
# Stops the server scripts/postgres-up.sh started and removes its folder.
set -euo pipefail
DIR=${LAUFBAND_PG_DIR:-/tmp/laufband-postgres}
[ -d "$DIR/data" ] || exit 0
BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)")
if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
else
    "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
fi
rm -rf "$DIR"
