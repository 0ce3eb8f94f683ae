#!/usr/bin/env bash
# Make sure `kubectl` is on PATH: tests/integration/test_manifests.py renders
# every overlay in deploy/kustomize with `kubectl kustomize`. When it is
# missing, install Debian's kubernetes-client (kubectl 1.20, whose built-in
# kustomize is the oldest the manifests are written for). Quiet and a no-op
# when kubectl is already there; installing needs root.
set -euo pipefail
if command -v kubectl >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-kubectl: kubectl is missing and there is no apt-get; install kubectl yourself" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-kubectl: kubectl is missing; installing Debian's kubernetes-client needs root:" \
        "run 'sudo scripts/ensure-kubectl.sh' or 'sudo apt-get install kubernetes-client'" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Quiet on success; on failure show apt's own words (e.g. a file conflict).
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends kubernetes-client; } \
    >"$log" 2>&1; then
    cat "$log" >&2
    echo "ensure-kubectl: installing Debian's kubernetes-client failed (apt output above)" >&2
    exit 1
fi
if ! command -v kubectl >/dev/null 2>&1; then
    echo "ensure-kubectl: installed kubernetes-client but kubectl is still not on PATH" >&2
    exit 1
fi
