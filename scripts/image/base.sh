#!/usr/bin/env bash
# Make the local base image for `make image`: no public registry is reachable
# here, so instead of docker.io/library/python:3.11-slim the Containerfile gets
# a Debian bookworm minbase root filesystem with Python 3 made by mmdebstrap,
# imported into buildah's storage as $BASE_IMAGE (default
# localhost/gpufleet-base:bookworm).
#
# The inputs (suite, package list, the excludes, this script) are hashed into
# the annotation io.gpufleet.base.inputs: when an image with that name and hash
# exists, it is reused and this script does nothing. BASE_EPOCH (default
# 0) is given to mmdebstrap and to the commit, so the same packages give the
# same root filesystem.
#
# Needs root, buildah and mmdebstrap (scripts/image/ensure-tools.sh). STORAGE_DRIVER
# (default vfs) and BUILDAH_ISOLATION (default chroot) as for build.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
# buildah 1.28 does not read STORAGE_DRIVER from the environment: name it on every call.
buildah() { command buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

base_image=${BASE_IMAGE:-localhost/gpufleet-base:bookworm}
suite=bookworm
# python3 brings the interpreter and its standard library (venv included);
# ca-certificates for the exporters' TLS (S3, HTTP, PostgreSQL) and registry pulls.
packages=python3,ca-certificates
epoch=${BASE_EPOCH:-0}
work=build/image/base

# Documentation, man pages and translations are not kept: the image only runs gpufleet.
dpkg_opts=(
    'path-exclude=/usr/share/doc/*'
    'path-include=/usr/share/doc/*/copyright'
    'path-exclude=/usr/share/man/*'
    'path-exclude=/usr/share/info/*'
    'path-exclude=/usr/share/locale/*'
    'path-include=/usr/share/locale/locale.alias'
    'path-exclude=/usr/share/lintian/*'
)

inputs=$(
    {
        echo "$suite $packages $epoch"
        printf '%s\n' "${dpkg_opts[@]}"
        cat "$0"
    } | sha256sum | cut -d' ' -f1
)

have=$(buildah inspect --type image --format '{{index .ImageAnnotations "io.gpufleet.base.inputs"}}' \
    "$base_image" 2>/dev/null || true)
if [ "$have" = "$inputs" ]; then
    echo "base: reusing $base_image (inputs $inputs)"
    exit 0
fi

start=$SECONDS
rm -rf "$work" && mkdir -p "$work"
# The merged-/usr hook sets the symlinks up itself and installs usr-is-merged; without
# it apt picks the usrmerge package, which pulls in the whole of perl (~50 MB).
mm_args=(--variant=minbase --include="$packages" --quiet
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
for opt in "${dpkg_opts[@]}"; do mm_args+=(--dpkgopt="$opt"); done
# apt's lists and caches, logs and the machine's identity are not part of an image.
mm_args+=(
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/debconf/*-old'
    --customize-hook='rm -rf "$1"/var/log/* "$1"/tmp/* "$1"/etc/machine-id "$1"/var/lib/dbus/machine-id'
    --customize-hook='find "$1"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +'
)
echo "base: mmdebstrap $suite with $packages"
log=$(mktemp)
# Quiet on success; on failure show mmdebstrap's own words.
if ! SOURCE_DATE_EPOCH=$epoch mmdebstrap "${mm_args[@]}" "$suite" "$work/rootfs.tar" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "base: mmdebstrap failed (output above)" >&2
    exit 1
fi
rm -f "$log"

ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah add --quiet "$ctr" "$work/rootfs.tar" /
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /usr/bin/python3 \
    --annotation "io.gpufleet.base.inputs=$inputs" "$ctr"
buildah commit --quiet --timestamp "$epoch" --rm "$ctr" "$base_image" >/dev/null
trap - EXIT
rm -f "$work/rootfs.tar"
echo "base: $base_image made in $((SECONDS - start)) s"
