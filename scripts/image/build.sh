#!/usr/bin/env bash
# Build gpufleet's container image with buildah, without a daemon and without
# network inside the build: `make image` runs it.
#
#   scripts/image/build.sh           base (if BASE is not given), context, build,
#                                    OCI archive, PUSH, build/image/image.json
#   scripts/image/build.sh context   only prepare build/image/context/ (for
#                                    `docker build -f Containerfile build/image/context`)
#
# Environment:
#   PUSH=host:port/repo   also push localhost/gpufleet:VERSION to $PUSH:VERSION
#                         (plain HTTP allowed: --tls-verify=false), then run
#                         scripts/image/publish.py (SBOM referrer, signatures)
#   BASE=image            the base image (default: the local Debian bookworm base
#                         scripts/image/base.sh makes)
#   REPRO_CHECK=1         build a second time and record whether every layer's
#                         digest came out the same
#   SOURCE_DATE_EPOCH     the timestamp of the image and its files (default: the
#                         time of the checkout's last commit)
#   STORAGE_DRIVER        buildah's storage driver (vfs: works everywhere as root)
#   BUILDAH_ISOLATION     how RUN steps are isolated (chroot: needs no runtime)
#   MAX_IMAGE_MB          the size limit of the runtime image, uncompressed (350)
#   PYTHON                the Python whose environment gives the pins (.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS

export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
# buildah 1.28 does not read STORAGE_DRIVER from the environment: name it on every call.
buildah() { command buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
py=${PYTHON:-.venv/bin/python}
out=build/image
ctx=$out/context
version=$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
name=localhost/gpufleet:$version
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then revision=$revision-dirty; fi
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
max_mb=${MAX_IMAGE_MB:-350}

# Runs a step quietly; on failure shows its output and names the step.
quiet() {
    local what=$1 log
    shift
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "image: $what failed (output above)" >&2
        exit 1
    fi
    rm -f "$log"
}

# The build context: the wheels of gpufleet[all] at the versions the project's
# venv resolved (its runtime closure only, scripts/image/constraints.py), pip's
# own wheel, and the SBOM of those wheels.
context() {
    local t=$SECONDS
    rm -rf "$ctx" && mkdir -p "$ctx/wheels"
    "$py" scripts/image/constraints.py >"$ctx/constraints.txt"
    echo "pip==$("$py" -c 'import pip; print(pip.__version__)')" >>"$ctx/constraints.txt"
    quiet "pip wheel" "$py" -m pip wheel --quiet --wheel-dir "$ctx/wheels" \
        --constraint "$ctx/constraints.txt" '.[all]' pip
    # The SBOM of exactly these wheels; the Containerfile copies it into the image.
    quiet "scripts/image/sbom.py" "$py" scripts/image/sbom.py
    if [ ! -f "$ctx/sbom.cdx.json" ]; then
        echo "image: scripts/image/sbom.py did not write $ctx/sbom.cdx.json" >&2
        exit 1
    fi
    echo "image: context ($(find "$ctx/wheels" -name '*.whl' | wc -l) wheels) in $((SECONDS - t)) s"
}

# bud TAG: one build of the Containerfile on $base into TAG.
bud() {
    quiet "buildah bud" buildah bud --quiet --format oci --layers --no-cache --pull=never \
        --isolation "$BUILDAH_ISOLATION" \
        --timestamp "$SOURCE_DATE_EPOCH" \
        --build-arg "BASE=$base" --build-arg "VERSION=$version" \
        --build-arg "REVISION=$revision" \
        -f Containerfile -t "$1" "$ctx"
}

if [ "${1:-}" = context ]; then
    context
    exit 0
fi
if [ -n "${1:-}" ]; then
    echo "usage: $0 [context]" >&2
    exit 2
fi

mkdir -p "$out"
if [ -n "${BASE:-}" ]; then
    base=$BASE
else
    base=localhost/gpufleet-base:bookworm
    t=$SECONDS
    BASE_IMAGE=$base scripts/image/base.sh
    base_s=$((SECONDS - t))
fi
context
t=$SECONDS
bud "$name"
build_s=$((SECONDS - t))
echo "image: built $name in $build_s s"

repro=()
if [ "${REPRO_CHECK:-}" = 1 ]; then
    t=$SECONDS
    bud "$name-repro"
    repro=(--repro "$name-repro")
    echo "image: second build for the reproducibility check in $((SECONDS - t)) s"
fi

archive=$out/gpufleet-$version.oci.tar
rm -f "$archive" "$out/archive.digest"
quiet "buildah push oci-archive" buildah push --quiet --digestfile "$out/archive.digest" \
    "$name" "oci-archive:$archive:gpufleet:$version"

push=()
if [ -n "${PUSH:-}" ]; then
    rm -f "$out/push.digest"
    quiet "buildah push $PUSH:$version" buildah push --quiet --tls-verify=false \
        --digestfile "$out/push.digest" "$name" "docker://$PUSH:$version"
    push=(--pushed "$PUSH:$version" --pushed-digest "$(cat "$out/push.digest")")
    echo "image: pushed $PUSH:$version@$(cat "$out/push.digest")"
fi

# What takes the space: the venv's largest distributions, and the base.
ctr=$(buildah from --pull=never "$name")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$(buildah mount "$ctr")
echo "image: what takes the space (MB)"
du -sm "$mnt"/opt/gpufleet "$mnt"/usr/lib "$mnt"/usr/share "$mnt"/usr/bin "$mnt"/var 2>/dev/null |
    sed "s|$mnt||" | sort -rn | sed 's/^/  /'
echo "image: largest in /opt/gpufleet/lib/python3*/site-packages (MB)"
# awk, not head: head stops reading, sort then dies of SIGPIPE, and pipefail fails the build.
du -sm "$mnt"/opt/gpufleet/lib/python3*/site-packages/* | sort -rn | awk 'NR <= 12' |
    sed "s|$mnt/opt/gpufleet/lib/python3[^/]*/site-packages/||" | sed 's/^/  /'
buildah umount "$ctr" >/dev/null
buildah rm "$ctr" >/dev/null
trap - EXIT

"$py" scripts/image/record.py --name "$name" --version "$version" --revision "$revision" \
    --archive "$archive" --archive-digest "$(cat "$out/archive.digest")" \
    --base "$base" --base-seconds "${base_s:-0}" --build-seconds "$build_s" \
    --total-seconds "$((SECONDS - start))" --max-mb "$max_mb" \
    "${push[@]}" "${repro[@]}" --output "$out/image.json"
if [ ${#repro[@]} != 0 ]; then buildah rmi "$name-repro" >/dev/null; fi
# --layers leaves every step's image behind, and vfs stores each in full: drop the untagged.
buildah rmi --prune >/dev/null 2>&1 || true

if [ -n "${PUSH:-}" ]; then
    # The SBOM as a referrer of the pushed image, and its signatures (build/image/publish.json).
    quiet "scripts/image/publish.py" "$py" scripts/image/publish.py \
        "$PUSH:$version@$(cat "$out/push.digest")"
fi
echo "image: done in $((SECONDS - start)) s"
