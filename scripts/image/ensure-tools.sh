#!/usr/bin/env bash
# Make sure the tools `make image` needs are installed: Debian's buildah (builds
# the Containerfile without a daemon) and mmdebstrap (makes the local Debian
# base, since no public registry is reachable here). uidmap gives buildah its
# newuidmap/newgidmap; with STORAGE_DRIVER=vfs no fuse-overlayfs is needed.
# Quiet and a no-op when every tool is there; installing needs root.
set -euo pipefail
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v newuidmap >/dev/null 2>&1 || missing+=(uidmap)
if [ ${#missing[@]} = 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-tools: ${missing[*]} missing and there is no apt-get; install them yourself" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-tools: ${missing[*]} missing; installing needs root:" \
        "run 'sudo scripts/image/ensure-tools.sh' or 'sudo apt-get install ${missing[*]}'" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Quiet on success; on failure show apt's own words.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >"$log" 2>&1; then
    cat "$log" >&2
    echo "ensure-tools: installing ${missing[*]} failed (apt output above)" >&2
    exit 1
fi
for tool in buildah mmdebstrap newuidmap; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "ensure-tools: installed ${missing[*]} but $tool is still not on PATH" >&2
        exit 1
    fi
done
