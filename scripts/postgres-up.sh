#!/usr/bin/env bash
# A throw-away PostgreSQL server for laufband's tests and benchmarks: installs the
# server if it is missing, makes a cluster in a temporary folder (initdb), starts it
# with pg_ctl (no systemd needed) and prints, as its last line on stdout,
#     export LAUFBAND_TEST_POSTGRES=postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
# so that `eval "$(scripts/postgres-up.sh)"` points the tests at it. Everything else
# goes to stderr. Idempotent: a second run reuses the running server.
# scripts/postgres-down.sh stops it and removes the folder.
set -euo pipefail

DIR=${LAUFBAND_PG_DIR:-/tmp/laufband-postgres}
PORT=${LAUFBAND_PG_PORT:-54329}   # not 5432: a distribution's own server may hold it
log() { echo "postgres-up: $*" >&2; }

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    log "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >&2 || { apt-get update -q >&2 && apt-get install -y -q postgresql >&2; }
fi
BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")

# The server refuses to run as root: run it as the (unprivileged) postgres user when we
# are root, else as ourselves.
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home "$DIR" postgres
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

url="postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
if [ -f "$DIR/data/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    log "already running in $DIR on port $PORT"
    echo "export LAUFBAND_TEST_POSTGRES=$url"
    exit 0
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    log "port $PORT is taken by another server: set LAUFBAND_PG_PORT to a free port"
    exit 1
fi

rm -rf "$DIR"
mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
# trust for the superuser on the loopback (a test server), passwords for the role
# `laufband` (the tests of ~/.pgpass and PGPASSWORD need a server that asks).
as_pg "$BIN/initdb" -D "$DIR/data" -U postgres -A trust >/dev/null
cat > "$DIR/data/pg_hba.conf" <<HBA
local all all trust
host all laufband 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
HBA
# Enough connections for 32 workers (each holds one or two) plus the tests.
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=300" start >&2
as_pg "$BIN/psql" -q -h "$DIR" -p "$PORT" -U postgres -d postgres \
    -c "CREATE ROLE laufband LOGIN CREATEDB PASSWORD 'laufband-secret'" >&2
log "running in $DIR on port $PORT"
echo "export LAUFBAND_TEST_POSTGRES=$url"
