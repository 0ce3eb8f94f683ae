#!/usr/bin/env bash
# Regenerate the committed gRPC code from proto/ with grpcio-tools.
# proto/gpufleet/device/v1alpha1/gpu.proto becomes
# src/gpufleet/deviceapi/v1alpha1/gpu_pb2{,_grpc}.py and gpu_pb2.pyi; the
# generated imports are rewritten to that package. OUT overrides the target
# directory (the drift test generates into a temp dir and compares).
# proto/k8s.io/kubelet/podresources/v1/api.proto (the kubelet's PodResources
# API) becomes src/gpufleet/exporter/podmap/kubelet_v1/api_pb2{,_grpc}.py and
# api_pb2.pyi the same way; OUT_PODRESOURCES overrides that target.
# proto/csi/v1/csi.proto (the CSI spec's subset the kernel cache's node plugin
# serves) becomes src/gpufleet/kcache/csi/v1/csi_pb2{,_grpc}.py and
# csi_pb2.pyi; OUT_CSI overrides that target.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-src/gpufleet/deviceapi/v1alpha1}
out_podresources=${OUT_PODRESOURCES:-src/gpufleet/exporter/podmap/kubelet_v1}
out_csi=${OUT_CSI:-src/gpufleet/kcache/csi/v1}
python=${PYTHON:-.venv/bin/python}
# The generator is pinned in pyproject.toml's dev extra (grpcio-tools==X);
# another version writes other code, so refuse it rather than drift.
pinned=$("$python" scripts/grpc-tools-pin.py)
installed=$("$python" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')
if [ "$pinned" != "$installed" ]; then
    echo "gen-proto: grpcio-tools $installed is installed, pyproject.toml pins $pinned;" \
        "run: $python -m pip install grpcio-tools==$pinned" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m grpc_tools.protoc -Iproto --python_out="$tmp" --pyi_out="$tmp" \
    --grpc_python_out="$tmp" proto/gpufleet/device/v1alpha1/gpu.proto
mkdir -p "$out"
for f in gpu_pb2.py gpu_pb2.pyi gpu_pb2_grpc.py; do
    sed 's/^from gpufleet\.device\.v1alpha1 import gpu_pb2/from gpufleet.deviceapi.v1alpha1 import gpu_pb2/' \
        "$tmp/gpufleet/device/v1alpha1/$f" >"$out/$f"
done

# The proto keeps upstream's package `v1` (it is part of the method path), so
# the module path protoc derives from the file name is rewritten to ours.
"$python" -m grpc_tools.protoc -Iproto --python_out="$tmp" --pyi_out="$tmp" \
    --grpc_python_out="$tmp" proto/k8s.io/kubelet/podresources/v1/api.proto
mkdir -p "$out_podresources"
for f in api_pb2.py api_pb2.pyi api_pb2_grpc.py; do
    sed 's/^from k8s\.io\.kubelet\.podresources\.v1 import api_pb2/from gpufleet.exporter.podmap.kubelet_v1 import api_pb2/' \
        "$tmp/k8s/io/kubelet/podresources/v1/$f" >"$out_podresources/$f"
done

# Upstream's package `csi.v1` stays (it is part of the method path); the
# module path is rewritten to ours as above.
"$python" -m grpc_tools.protoc -Iproto --python_out="$tmp" --pyi_out="$tmp" \
    --grpc_python_out="$tmp" proto/csi/v1/csi.proto
mkdir -p "$out_csi"
for f in csi_pb2.py csi_pb2.pyi csi_pb2_grpc.py; do
    sed 's/^from csi\.v1 import csi_pb2/from gpufleet.kcache.csi.v1 import csi_pb2/' \
        "$tmp/csi/v1/$f" >"$out_csi/$f"
done
