#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests and benchmarks: `start|stop STATE_DIR`.
#
# The cluster lives in a fresh `mktemp -d` under /tmp, not under STATE_DIR:
# the server runs as `postgres` (it refuses root) and must be able to traverse
# every directory above its data, which a checkout under /root or /work need
# not allow. STATE_DIR/postgres/tmpdir remembers where it is, so `stop` finds it.
# Settings go into postgresql.conf, so the tests can stop the server and bring
# it back on the same port with a plain `pg_ctl -D GPUFLEET_TEST_PG_DATA -l GPUFLEET_TEST_PG_LOG -w start`.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../servers-lib.sh
source scripts/servers-lib.sh

server_args postgres "$@"

as_postgres() {
    # From a directory postgres can read, so it does not warn about the cwd.
    (cd / && runuser -u postgres -- "$@")
}

pg_bin() {
    # The newest installed major version; Debian installs them side by side.
    local initdb
    initdb=$(find /usr/lib/postgresql -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1)
    [ -n "$initdb" ] && dirname "$initdb"
}

stop() {
    [ -f "$mine/tmpdir" ] || return 0
    local tmp bin
    tmp=$(cat "$mine/tmpdir")
    bin=$(pg_bin || true)
    if [ -n "$bin" ] && [ -f "$tmp/data/postmaster.pid" ]; then
        as_postgres "$bin/pg_ctl" -D "$tmp/data" -m fast -w -t 30 stop >/dev/null ||
            echo "test-servers: postgres in $tmp did not stop" >&2
    fi
    # Only ever remove what start made: a mktemp directory under /tmp.
    case "$tmp" in
    /tmp/gpufleet-pg.*) rm -rf "$tmp" ;;
    esac
    rm -f "$mine/tmpdir"
}

start() {
    stop
    if [ -z "$(pg_bin || true)" ]; then
        echo "test-servers: installing Debian postgresql"
        apt_install postgresql
    fi
    local bin tmp port
    bin=$(pg_bin)
    mkdir -p "$mine"
    tmp=$(mktemp -d /tmp/gpufleet-pg.XXXXXX)
    echo "$tmp" >"$mine/tmpdir"
    chown postgres:postgres "$tmp"
    chmod 700 "$tmp"
    as_postgres "$bin/initdb" -D "$tmp/data" -A trust -U postgres -E UTF8 --locale=C.UTF-8 \
        --no-sync >"$mine/initdb.log" 2>&1 || {
        cat "$mine/initdb.log" >&2
        return 1
    }
    port=$(free_port)
    cat >>"$tmp/data/postgresql.conf" <<EOF
# gpufleet test server
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$tmp'
max_connections = 200
EOF
    as_postgres "$bin/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w -t 60 start >/dev/null || {
        cat "$tmp/server.log" >&2
        return 1
    }
    wait_port "$port" 30
    as_postgres "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres gpufleet_test
    # A restart replaces this server's facts rather than adding a second set.
    [ -f "$state/env" ] && sed -i '/^GPUFLEET_TEST_PG_[A-Z]*=/d' "$state/env"
    cat >>"$state/env" <<EOF
GPUFLEET_TEST_PG_HOST=127.0.0.1
GPUFLEET_TEST_PG_PORT=$port
GPUFLEET_TEST_PG_USER=postgres
GPUFLEET_TEST_PG_DB=gpufleet_test
GPUFLEET_TEST_PG_DATA=$tmp/data
GPUFLEET_TEST_PG_BIN=$bin
GPUFLEET_TEST_PG_LOG=$tmp/server.log
EOF
    echo "test-servers: postgres $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
}

case "$action" in
start) start ;;
stop) stop ;;
*) usage ;;
esac
