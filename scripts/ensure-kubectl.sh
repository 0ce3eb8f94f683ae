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
# shellcheck source=apt-lib.sh
source "$(dirname "$0")/apt-lib.sh"
apt_ensure ensure-kubectl scripts/ensure-kubectl.sh kubernetes-client
if ! command -v kubectl >/dev/null 2>&1; then
    echo "ensure-kubectl: installed kubernetes-client but kubectl is still not on PATH" >&2
    exit 1
fi
