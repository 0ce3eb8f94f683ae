"""The kubelet's side of the CSI plugin, for every test that calls it over its socket.

`Place` is a kubelet-shaped directory with a store and the socket (one node's, or one per
node); `publish_request` builds exactly what the kubelet sends for an inline ephemeral volume
of a CSIDriver with ``podInfoOnMount: true`` (`volume_context`, `volume_id`), and
`pod_publish_request` builds it from a Pod object; `node_client` is the Node client the
kubelet holds. The plugin tests also get `Plugin`: `CsiServer` with a `NodeServicer` over
`FakeVolumeSource` (what the node state would answer: a prepared store directory, or a
`VolumeError`), real mounts and a real `PublicationLog`, with the generated client stubs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
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
    """A short /tmp directory with a kubelet dir, a store and the socket; unmounted on close.

    With `entry`, the store holds one ready entry (`entry`, handed out by `volume`) for a
    plugin over `FakeVolumeSource`; a real node process fills its store itself. A test of
    several nodes takes a store and an endpoint per node (`store_of`, `endpoint_of`).
    """

    def __init__(self, prefix: str = "kc-csi-", *, entry: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
        self.kubelet = self.root / "kubelet"
        self.store = self.root / "store"
        self.socket = self.root / "csi.sock"
        self.kubelet.mkdir()
        self.entry = self.store / "caches" / "sha256" / ("ab" * 32) / "entry"
        if entry:
            self.entry.mkdir(parents=True)
            (self.entry / "triton").mkdir()
            (self.entry / "triton" / "add.cubin").write_bytes(b"cubin")

    @property
    def endpoint(self) -> str:
        """The CSI endpoint of `socket`, as ``CSI_ENDPOINT`` names it."""
        return f"unix://{self.socket}"

    def store_of(self, node: str) -> Path:
        """The store of `node`, where several nodes share the place."""
        return self.root / f"store-{node}"

    def endpoint_of(self, node: str) -> str:
        """The CSI endpoint of `node`, where several nodes share the place."""
        return f"unix://{self.root}/{node}.sock"

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


@contextlib.contextmanager
def kubelet_place(prefix: str = "kc-csi-", *, entry: bool = False) -> Iterator[Place]:
    """A `Place` for the block, closed (unmounted, removed) after it, whatever happened."""
    place = Place(prefix, entry=entry)
    try:
        yield place
    finally:
        place.close()


def mount_tmpfs(where: Path) -> None:
    """Mount a small tmpfs at `where`: a mount the plugin did not make."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "other", where], check=True)


def volume_context(
    *,
    pod_uid: str = POD_UID,
    pod_name: str = POD_NAME,
    namespace: str = NAMESPACE,
    service_account: str = "default",
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
        "csi.storage.k8s.io/pod.name": pod_name,
        "csi.storage.k8s.io/pod.namespace": namespace,
        "csi.storage.k8s.io/pod.uid": pod_uid,
        "csi.storage.k8s.io/serviceAccount.name": service_account,
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


def pod_publish_request(
    pod: Mapping[str, Any], target: Path, volume: str, *, namespace: str | None = None
) -> csi_pb2.NodePublishVolumeRequest:
    """What the kubelet sends for `pod`'s inline volume `volume`: its attributes, the pod info.

    `namespace` stands in for the pod's own in the pod info (a kubelet that lies).
    """
    metadata = pod["metadata"]
    (csi,) = (v["csi"] for v in pod["spec"]["volumes"] if v["name"] == volume)
    return publish_request(
        target,
        volume=volume_id(metadata["uid"], volume),
        context=volume_context(
            pod_uid=metadata["uid"],
            pod_name=metadata["name"],
            namespace=namespace or metadata["namespace"],
            service_account=pod["spec"].get("serviceAccountName", "default"),
            attributes=csi["volumeAttributes"],
        ),
    )


@contextlib.asynccontextmanager
async def node_client(endpoint: str) -> AsyncIterator[csi_pb2_grpc.NodeStub]:
    """The kubelet's ``csi.v1.Node`` client of the plugin at `endpoint`, for the block."""
    async with csi_channel(endpoint) as channel:
        yield csi_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def csi_channel(endpoint: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the plugin at `endpoint`, closed after the block."""
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        yield channel
    finally:
        await channel.close()


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
    server = CsiServer(place.endpoint, node=node, ready=lambda: ready[0])
    await server.start()
    try:
        async with csi_channel(place.endpoint) as channel:
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
        await server.stop(0)
