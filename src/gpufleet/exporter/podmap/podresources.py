"""Which container holds which GPU, from the kubelet's PodResources API.

The kubelet serves ``v1.PodResourcesLister`` on a unix socket. Its ``List``
answers, for every pod on the node, which device-plugin device ids each
container was allocated. For NVIDIA's device plugin these ids are GPU UUIDs
(``GPU-…``), MIG UUIDs (``MIG-…``), or whatever the plugin was told to
advertise (an index such as ``"0"``). This is how a whole GPU or a MIG slice is
attributed to a pod even when no process runs on it.

Shared GPUs: the device plugin's time-slicing and MPS modes advertise one GPU
as several replicas with ids ``<uuid>::<n>``, under ``nvidia.com/gpu`` or, with
``renameByDefault``, under ``nvidia.com/gpu.shared`` (``nvidia.com/mig-….shared``
for MIG). Those resource names count as GPU resources, and the ids are kept
exactly as the kubelet reports them. Each replica therefore has its one owner,
and a lookup by bare GPU UUID does not pretend that a shared GPU belongs to a
single pod: who uses a shared GPU is a question for per-process attribution.

GPUs and MIG devices handed out through Dynamic Resource Allocation are read
from ``dynamic_resources``. A claim names each device as (driver, pool, device),
not by UUID; with a `DraResolver` (this node's ResourceSlices, see
`resourceslices`), each is resolved to the GPU or MIG UUID the driver
published. A device whose slice is not known yet has no owner until it is. One
claim may be shared: a device claimed by several containers of one pod is
owned by the pod (container ``""``), and one claimed by several pods has no
single owner, as for time-sliced GPUs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import grpc
import grpc.aio

from gpufleet.exporter.errors import PodResourcesError
from gpufleet.exporter.podmap.draindex import DraDevice
from gpufleet.exporter.podmap.kubelet_v1 import api_pb2, api_pb2_grpc

__all__ = [
    "DEFAULT_SOCKET",
    "ContainerAllocation",
    "ContainerRef",
    "DraResolver",
    "PodResourcesClient",
    "is_gpu_resource",
]

DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
"""Where the kubelet serves the PodResources API (mount the directory, not the
socket file: the kubelet recreates the socket when it restarts)."""

_log = logging.getLogger(__name__)

# MIG resource names carry the profile (mig-1g.10gb, mig-1g.10gb.me,
# mig-1c.3g.40gb, ...), and the list grows with every GPU generation, so any
# non-empty profile is accepted rather than a fixed table.
_GPU_RESOURCE = re.compile(r"nvidia\.com/(?:gpu(?:\.shared)?|mig-[A-Za-z0-9][A-Za-z0-9._-]*)")

# A DRA device is resolved to whatever its driver published as ``uuid``; only
# NVML's own UUIDs may become GPU owners, so that no other driver's value can
# collide with a GPU index ("0") or another key of the device map.
_NVML_UUID = re.compile(r"(?:GPU|MIG)-")

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """One container of one pod: the owner of a GPU device."""

    namespace: str
    pod: str
    container: str


@dataclass(frozen=True, slots=True)
class ContainerAllocation:
    """What the kubelet allocated to one container: GPU device-plugin ids and DRA devices."""

    ref: ContainerRef
    device_ids: tuple[str, ...]
    """Device-plugin ids of GPU resources only (see `is_gpu_resource`), as advertised."""
    dra_devices: tuple[DraDevice, ...]
    """Every (driver, pool, device) of the container's DRA claims, of any driver."""


class DraResolver(Protocol):
    """Resolves DRA devices to UUIDs: what `resourceslices.ResourceSliceIndex` provides."""

    @property
    def generation(self) -> int:
        """Moves whenever any answer of `uuid` may have changed."""
        ...

    def uuid(self, device: DraDevice) -> str | None:
        """The UUID the driver published for ``device``, or None."""
        ...


def is_gpu_resource(resource_name: str) -> bool:
    """Whether a kubelet resource name is an NVIDIA GPU or MIG device.

    True for ``nvidia.com/gpu``, ``nvidia.com/mig-<profile>`` (for example
    ``nvidia.com/mig-1g.10gb``) and the shared variants the device plugin
    advertises for time-slicing and MPS (``nvidia.com/gpu.shared``,
    ``nvidia.com/mig-1g.10gb.shared``). False for everything else, including
    other vendors and renamed resources outside ``nvidia.com/gpu`` and
    ``nvidia.com/mig-``.
    """
    return _GPU_RESOURCE.fullmatch(resource_name) is not None


class PodResourcesClient:
    """Which container holds which GPU device id, from the kubelet; cached for `ttl` seconds.

    The channel opens on first use. The gRPC receive limit is raised from the
    default 4 MiB to ``max_message_bytes`` because ``List`` answers for every
    pod on the node, and a busy node's reply outgrows 4 MiB. With `dra`, GPUs
    allocated through DRA claims are resolved to their UUIDs through it.
    """

    def __init__(
        self,
        socket_path: Path = DEFAULT_SOCKET,
        *,
        ttl: float = 10.0,
        max_message_bytes: int = 64 * _MIB,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        dra: DraResolver | None = None,
    ) -> None:
        self._socket_path = Path(socket_path)
        self._ttl = ttl
        self._max_message_bytes = max_message_bytes
        self._timeout = timeout
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._dra = dra
        self._allocations: tuple[ContainerAllocation, ...] | None = None
        self._fetched_at = 0.0
        # The device map is rebuilt when the allocations or the resolver's
        # answers change, not on every call: the collector asks every interval.
        self._devices: Mapping[str, ContainerRef] | None = None
        self._devices_from: tuple[tuple[ContainerAllocation, ...], int] | None = None
        self._list_calls = 0
        self._warned_duplicates: set[str] = set()
        self._noted_shared: set[str] = set()
        # Callers arriving while a List is in flight wait for its answer
        # instead of sending their own: one List per ttl, not per caller.
        self._refresh = asyncio.Lock()

    @property
    def socket_path(self) -> Path:
        """The kubelet socket this client reads."""
        return self._socket_path

    @property
    def list_calls(self) -> int:
        """How many List RPCs this client has sent, answered or not."""
        return self._list_calls

    async def devices(self) -> Mapping[str, ContainerRef]:
        """Device id -> the container it is allocated to, for GPU resources only.

        Device-plugin ids are exactly as the plugin advertised them: a GPU UUID
        (``GPU-…``), a MIG UUID (``MIG-…``), an index such as ``"0"``, or a
        shared replica ``<uuid>::<n>``. DRA devices appear under the GPU or MIG
        UUID that `dra` resolves them to, once it can; a DRA device shared by
        the containers of one pod maps to that pod with container ``""``, and
        one shared by several pods is left out. The kubelet's answer is the
        one `allocations` returns; errors are its errors.
        """
        allocations = await self.allocations()
        key = (allocations, self._dra.generation if self._dra is not None else 0)
        if self._devices is None or self._devices_from != key:
            self._devices = MappingProxyType(self._owners(allocations))
            self._devices_from = key
        return self._devices

    async def allocations(self) -> tuple[ContainerAllocation, ...]:
        """Every container with GPU device-plugin ids or DRA devices, in the kubelet's order.

        Served from cache while younger than ``ttl``; otherwise one List call.
        Raises `PodResourcesError`, naming the socket, when the socket is
        missing, the kubelet refuses or does not answer in ``timeout``, the
        reply is over ``max_message_bytes``, or the kubelet does not serve the
        v1 API. A failure is neither retried within the call nor cached: the
        next call sends one List again.
        """
        cached = self._cached()
        if cached is not None:
            return cached
        async with self._refresh:
            cached = self._cached()
            if cached is not None:
                return cached
            reply = await self._list()
            allocations = _allocations(reply)
            self._allocations, self._fetched_at = allocations, self._clock()
            return allocations

    async def close(self) -> None:
        """Close the channel; a later `devices` call opens a new one."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    def _cached(self) -> tuple[ContainerAllocation, ...] | None:
        if self._allocations is None or self._clock() - self._fetched_at >= self._ttl:
            return None
        return self._allocations

    async def _list(self) -> api_pb2.ListPodResourcesResponse:
        # gRPC would report a missing socket as a generic UNAVAILABLE after a
        # connect attempt; a stat says it plainly, and this is the usual
        # mistake (the pod-resources directory not mounted into the pod).
        if not self._socket_path.exists():
            raise PodResourcesError(
                f"kubelet PodResources socket {self._socket_path} does not exist "
                "(is the kubelet's pod-resources directory mounted into this pod?)"
            )
        stub = self._connect()
        self._list_calls += 1
        try:
            reply: api_pb2.ListPodResourcesResponse = await stub.List(
                api_pb2.ListPodResourcesRequest(), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                # A channel whose connection failed waits out a reconnect
                # backoff of up to two minutes before trying again; a kubelet
                # that restarted is back long before that. Start afresh.
                await self.close()
            raise PodResourcesError(self._describe(exc)) from None
        return reply

    def _connect(self) -> Any:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                f"unix://{self._socket_path}",
                options=[
                    ("grpc.max_receive_message_length", self._max_message_bytes),
                    # The requests are empty; the limit only has to be sane.
                    ("grpc.max_send_message_length", self._max_message_bytes),
                    # Channels share connections process-wide by default, and
                    # with them a failed connection's reconnect backoff; our
                    # own pool lets a new channel (see _list) connect at once.
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
            # The generated _grpc module has no annotations (see pyproject.toml).
            self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    def _describe(self, exc: grpc.aio.AioRpcError) -> str:
        code = exc.code()
        details = " ".join((exc.details() or "").split())
        where = f"kubelet PodResources List on {self._socket_path}"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return (
                f"{where}: the reply is larger than the {_size(self._max_message_bytes)} "
                f"receive limit (max_message_bytes); raise it ({details})"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{where}: no answer within {self._timeout:g} s"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return (
                f"{where}: the socket does not serve v1.PodResourcesLister/List "
                f"(a kubelet too old for the v1 API?) ({details})"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"{where}: kubelet unavailable ({details})"
        return f"{where}: {code.name} ({details})"

    def _owners(self, allocations: tuple[ContainerAllocation, ...]) -> dict[str, ContainerRef]:
        owners: dict[str, ContainerRef] = {}
        for allocation in allocations:
            for device_id in allocation.device_ids:
                first = owners.setdefault(device_id, allocation.ref)
                if first != allocation.ref:
                    self._warn_duplicate(device_id, first, allocation.ref)
        if self._dra is None:
            return owners
        # One claim may be shared by several containers and pods, so a DRA
        # device legitimately appears more than once: collect every claimant.
        claimants: dict[str, dict[ContainerRef, None]] = {}
        for allocation in allocations:
            for device in allocation.dra_devices:
                uuid = self._dra.uuid(device)
                if uuid is not None and _NVML_UUID.match(uuid):
                    claimants.setdefault(uuid, {})[allocation.ref] = None
        for uuid, refs in claimants.items():
            owner = _single_owner(list(refs))
            if owner is None:
                self._note_shared(uuid, list(refs))
                continue
            first = owners.setdefault(uuid, owner)
            if first != owner:
                self._warn_duplicate(uuid, first, owner)
        return owners

    def _note_shared(self, uuid: str, refs: list[ContainerRef]) -> None:
        # Sharing a claim across pods is allowed (and an admin-access claim of
        # a monitoring pod looks the same): not a fault, so info, once.
        if uuid in self._noted_shared:
            return
        self._noted_shared.add(uuid)
        _log.info(
            "GPU claimed through DRA by several pods; it has no single owner",
            extra={"gpu_uuid": uuid, "pods": sorted({f"{r.namespace}/{r.pod}" for r in refs})},
        )

    def _warn_duplicate(self, device_id: str, kept: ContainerRef, dropped: ContainerRef) -> None:
        # The kubelet never hands one device to two containers; if it seems to,
        # say so once per device rather than on every refresh.
        if device_id in self._warned_duplicates:
            return
        self._warned_duplicates.add(device_id)
        _log.warning(
            "GPU device allocated to two containers; keeping the first",
            extra={
                "device_id": device_id,
                "kept": f"{kept.namespace}/{kept.pod}/{kept.container}",
                "ignored": f"{dropped.namespace}/{dropped.pod}/{dropped.container}",
                "socket": str(self._socket_path),
            },
        )


def _allocations(reply: api_pb2.ListPodResourcesResponse) -> tuple[ContainerAllocation, ...]:
    found: list[ContainerAllocation] = []
    for pod in reply.pod_resources:
        for container in pod.containers:
            device_ids = tuple(
                device_id
                for devices in container.devices
                if is_gpu_resource(devices.resource_name)
                for device_id in devices.device_ids
            )
            dra_devices = tuple(
                DraDevice(claimed.driver_name, claimed.pool_name, claimed.device_name)
                for dynamic in container.dynamic_resources
                for claimed in dynamic.claim_resources
                if claimed.driver_name and claimed.pool_name and claimed.device_name
            )
            if device_ids or dra_devices:
                ref = ContainerRef(pod.namespace, pod.name, container.name)
                found.append(ContainerAllocation(ref, device_ids, dra_devices))
    return tuple(found)


def _single_owner(refs: list[ContainerRef]) -> ContainerRef | None:
    if len(refs) == 1:
        return refs[0]
    pods = {(ref.namespace, ref.pod) for ref in refs}
    if len(pods) == 1:
        ((namespace, pod),) = pods
        return ContainerRef(namespace, pod, "")
    return None


def _size(n: int) -> str:
    if n % _MIB == 0:
        return f"{n // _MIB} MiB ({n} bytes)"
    return f"{n} bytes"
