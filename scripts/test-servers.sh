#!/usr/bin/env bash
# Install and start the real servers the test suite talks to, or stop them.
# Each server is a script in scripts/servers/ with `start STATE_DIR` and
# `stop STATE_DIR`; it runs on a free loopback port with its files under
# STATE_DIR/<name>/ and appends KEY=VALUE lines to STATE_DIR/env, which the
# tests read (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
state=$PWD/.testservers
case "${1:-}" in
start)
    "$0" stop >/dev/null 2>&1 || true
    rm -rf "$state" && mkdir -p "$state"
    chmod 755 "$state"
    : >"$state/env"
    for server in scripts/servers/*.sh; do
        echo "test-servers: starting $(basename "$server" .sh)"
        bash "$server" start "$state"
    done
    ;;
stop)
    [ -d "$state" ] || exit 0
    for server in scripts/servers/*.sh; do
        bash "$server" stop "$state" || echo "test-servers: $(basename "$server" .sh) did not stop cleanly" >&2
    done
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
