#!/usr/bin/env bash
# Install and start the real servers the test suite talks to, or stop them.
# Each server gets a free loopback port and a directory under .testservers/;
# tests find them through .testservers/env. The foundation needs none yet:
# PostgreSQL, the S3 server and the OCI registry are added with the features
# that use them.
set -euo pipefail
cd "$(dirname "$0")/.."
state=.testservers
case "${1:-}" in
start)
    rm -rf "$state" && mkdir -p "$state"
    : >"$state/env"
    ;;
stop)
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
