"""The CSI plugin under test: a real server on a real unix socket, a kubelet-shaped directory.

`Plugin` starts `CsiServer` with a `NodeServicer` over `FakeVolumeSource` (what the node state
would answer: a prepared store directory, or a `VolumeError`), real mounts and a real
`PublicationLog`, and gives the generated client stubs. `publish_request` builds exactly what
the kubelet sends for an inline ephemeral volume of a CSIDriver with ``podInfoOnMount: true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio

from gpufleet.kcache.cluster import PreparedVolume, VolumeRequest
from gpufleet.kcache.csi import CsiServer, NodeServicer
from gpufleet.kcache.csi.v1 import csi_pb2, csi_pb2_grpc
from gpufleet.kcache.errors import VolumeError
from gpufleet.kcache.mounts import read_mountinfo
from gpufleet.kcache.publications import PUBLICATIONS, PublicationLog

POD_UID = "0d2a6c1e-5b7f-4c1a-9e3d-2f1b8a7c6d5e"
POD_NAME = "vector-add-7d9f8"
NAMESPACE = "team-a"
VOLUME = "kernels"
CACHE = "vector-add-cache"
DIGEST = "sha256:" + "ab" * 32
MOUNT_ROOT = "/kernels"


def volume_id(pod_uid: str = POD_UID, volume: str = VOLUME) -> str:
    """The kubelet's id of an inline volume: ``csi-`` + hex sha256 of pod uid + volume name."""
    return "csi-" + hashlib.sha256(f"{pod_uid}{volume}".encode()).hexdigest()


@dataclass
class FakeVolumeSource:
    """A `VolumeSource` answering with `volume` or raising `error`; it counts its calls."""

    volume: PreparedVolume | None = None
    error: VolumeError | None = None
    prepare_calls: list[VolumeRequest] = field(default_factory=list)
    publish_calls: list[tuple[VolumeRequest, PreparedVolume]] = field(default_factory=list)
    unpublish_calls: list[str] = field(default_factory=list)

    async def prepare(self, request: VolumeRequest) -> PreparedVolume:
        """`volume`, or raise `error`."""
        self.prepare_calls.append(request)
        if self.error is not None:
            raise self.error
        assert self.volume is not None
        return self.volume

    async def published(self, request: VolumeRequest, volume: PreparedVolume) -> None:
        """Counted."""
        self.publish_calls.append((request, volume))

    async def unpublished(self, volume_id: str) -> None:
        """Counted."""
        self.unpublish_calls.append(volume_id)


class Place:
    """A short temp directory with a kubelet dir, a store and the socket; unmounted on close."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix="kc-csi-"))
        self.kubelet = self.root / "kubelet"
        self.store = self.root / "store"
        self.socket = self.root / "csi.sock"
        self.kubelet.mkdir()
        self.entry = self.store / "caches" / "sha256" / ("ab" * 32) / "entry"
        self.entry.mkdir(parents=True)
        (self.entry / "triton").mkdir()
        (self.entry / "triton" / "add.cubin").write_bytes(b"cubin")

    def volume(self, path: Path | None = None) -> PreparedVolume:
        """The store entry as `prepare` hands it out."""
        return PreparedVolume(path=path or self.entry, digest=DIGEST, mount_root=MOUNT_ROOT)

    def target(
        self, pod_uid: str = POD_UID, volume: str = VOLUME, *, make_parent: bool = True
    ) -> Path:
        """The kubelet's target of `volume` of `pod_uid`; its parent made as the kubelet does."""
        parent = self.kubelet / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / volume
        if make_parent:
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "vol_data.json").write_text('{"driverName":"csi.gkm.io"}')
        return parent / "mount"

    def close(self) -> None:
        """Unmount whatever the tests left mounted under the place, then remove it."""
        for entry in reversed(read_mountinfo()):
            if self.root in entry.mount_point.parents:
                subprocess.run(["umount", "-l", os.fspath(entry.mount_point)], check=False)
        shutil.rmtree(self.root)


def mount_tmpfs(where: Path) -> None:
    """Mount a small tmpfs at `where`: a mount the plugin did not make."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "other", where], check=True)


def volume_context(
    *,
    pod_uid: str = POD_UID,
    namespace: str = NAMESPACE,
    attributes: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What the kubelet sends: the pod's volumeAttributes plus the pod info and ephemeral."""
    given = (
        {"csi.gkm.io/GKMCache": CACHE, "csi.gkm.io/namespace": NAMESPACE}
        if attributes is None
        else dict(attributes)
    )
    return {
        **given,
        "csi.storage.k8s.io/pod.name": POD_NAME,
        "csi.storage.k8s.io/pod.namespace": namespace,
        "csi.storage.k8s.io/pod.uid": pod_uid,
        "csi.storage.k8s.io/serviceAccount.name": "default",
        "csi.storage.k8s.io/ephemeral": "true",
    }


def publish_request(
    target: Path,
    *,
    volume: str | None = None,
    context: Mapping[str, str] | None = None,
    readonly: bool = False,
    secrets: Mapping[str, str] | None = None,
) -> csi_pb2.NodePublishVolumeRequest:
    """A ``NodePublishVolume`` as the kubelet sends it for an inline volume (readOnly unset)."""
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume if volume is not None else volume_id(),
        target_path=os.fspath(target),
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        ),
        readonly=readonly,
        secrets=secrets or {},
        volume_context=volume_context() if context is None else context,
    )


@dataclass
class Plugin:
    """A running plugin and clients of it."""

    place: Place
    source: FakeVolumeSource
    log: PublicationLog
    server: CsiServer
    channel: grpc.aio.Channel
    node: csi_pb2_grpc.NodeStub
    identity: csi_pb2_grpc.IdentityStub
    ready: list[bool]


@contextlib.asynccontextmanager
async def running_plugin(
    place: Place, source: FakeVolumeSource, **collaborators: Any
) -> AsyncIterator[Plugin]:
    """`CsiServer` on ``place.socket`` until the block ends; `collaborators` go to the servicer."""
    log = PublicationLog(place.store / PUBLICATIONS)
    ready = [True]
    node = NodeServicer(
        source, kubelet_dir=place.kubelet, node_id="node-1", publications=log, **collaborators
    )
    server = CsiServer(f"unix://{place.socket}", node=node, ready=lambda: ready[0])
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix://{place.socket}")
    try:
        yield Plugin(
            place=place,
            source=source,
            log=log,
            server=server,
            channel=channel,
            node=csi_pb2_grpc.NodeStub(channel),  # type: ignore[no-untyped-call]
            identity=csi_pb2_grpc.IdentityStub(channel),  # type: ignore[no-untyped-call]
            ready=ready,
        )
    finally:
        await channel.close()
        await server.stop(0)
