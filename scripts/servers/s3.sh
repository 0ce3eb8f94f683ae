#!/usr/bin/env bash
# A throwaway S3 for the tests: moto's server on loopback, `start|stop STATE_DIR`.
#
# No S3-compatible server is packaged in Debian (no MinIO; Ceph RGW needs a
# cluster), so the tests talk to `moto_server` from the venv (moto[server] is a
# dev dependency). It keeps buckets in memory: a restart starts empty.
# Its pid, port and log live in STATE_DIR/s3/; it appends
# GPUFLEET_TEST_S3_ENDPOINT=http://127.0.0.1:PORT to STATE_DIR/env.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../servers-lib.sh
source scripts/servers-lib.sh

server_args s3 "$@"

# The pid of our moto server, if it is alive and still moto.
running_pid() {
    live_pid "$mine/pid" moto_server
}

stop() {
    local pid
    if pid=$(running_pid); then terminate "$pid"; fi
    rm -f "$mine/pid" "$mine/port"
    # A stopped server's endpoint must not linger for the tests to find.
    if [ -f "$state/env" ]; then sed -i '/^GPUFLEET_TEST_S3_ENDPOINT=/d' "$state/env"; fi
}

publish() {
    # A restart replaces this server's facts rather than adding a second set.
    touch "$state/env"
    sed -i '/^GPUFLEET_TEST_S3_ENDPOINT=/d' "$state/env"
    echo "GPUFLEET_TEST_S3_ENDPOINT=http://127.0.0.1:$1" >>"$state/env"
}

start() {
    local port pid
    mkdir -p "$mine"
    # Idempotent: a live server is kept (its buckets too) and re-published.
    if running_pid >/dev/null && [ -f "$mine/port" ]; then
        port=$(cat "$mine/port")
        if wait_port "$port" 5; then
            publish "$port"
            echo "test-servers: s3 (moto) already on 127.0.0.1:$port"
            return 0
        fi
    fi
    stop
    if [ ! -x .venv/bin/moto_server ]; then
        echo "test-servers: .venv/bin/moto_server missing; pip install -e '.[all,dev]'" >&2
        return 1
    fi
    port=$(free_port)
    nohup .venv/bin/moto_server -H 127.0.0.1 -p "$port" >"$mine/server.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$mine/pid"
    echo "$port" >"$mine/port"
    wait_port "$port" 30 || {
        cat "$mine/server.log" >&2
        stop
        return 1
    }
    publish "$port"
    echo "test-servers: s3 (moto $(.venv/bin/python -c 'import moto; print(moto.__version__)')) on 127.0.0.1:$port"
}

case "$action" in
start) start ;;
stop) stop ;;
*) usage ;;
esac
