#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests: Debian's postgresql 15 binaries, run as a
# non-root user, data directory, socket and log in a temporary directory, listening on
# 127.0.0.1 only. No service, no Docker.
#
#   eval "$(scripts/pg-test-cluster.sh start)"   # prints export XRAY_TRIAGE_TEST_DATABASE_URL=... and PG_TEST_DIR=...
#   scripts/pg-test-cluster.sh stop "$PG_TEST_DIR"
#
# The cluster runs with fsync off (a test database need not survive a power cut; the
# durability settings of a real server are the site's own postgresql.conf).
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_USER=${PG_TEST_OS_USER:-postgres}   # the OS user the server runs as when we are root

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

case "${1:-}" in
  start)
    [ -x "$PG_BIN/initdb" ] || { echo "PostgreSQL binaries not found in $PG_BIN (apt-get install postgresql)" >&2; exit 1; }
    if [ "$(id -u)" -eq 0 ] && ! id "$PG_USER" >/dev/null 2>&1; then
      useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
    fi
    dir=$(mktemp -d /tmp/xray-triage-pg.XXXXXX)
    chmod 755 "$dir"
    [ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg "$PG_BIN/initdb" -D "$dir/data" -U xray -A trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
      -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
      >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    echo "export PG_TEST_DIR=$dir"
    echo "export XRAY_TRIAGE_TEST_DATABASE_URL=postgresql+psycopg://xray@127.0.0.1:$port/postgres"
    ;;
  stop)
    dir=${2:?usage: $0 stop PG_TEST_DIR}
    as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 start | stop PG_TEST_DIR" >&2; exit 2 ;;
esac
