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
# shellcheck source=../apt-lib.sh
source "$(dirname "$0")/../apt-lib.sh"
apt_ensure ensure-tools scripts/image/ensure-tools.sh "${missing[@]}"
for tool in buildah mmdebstrap newuidmap; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "ensure-tools: installed ${missing[*]} but $tool is still not on PATH" >&2
        exit 1
    fi
done
