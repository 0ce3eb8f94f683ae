"""A fake kubelet PodResources API: a real grpc.aio server on a unix socket.

It serves ``v1.PodResourcesLister`` (List, GetAllocatableResources, Get) from
the same generated code the exporter's client uses, so the client's requests
and the fake's replies cross a real socket in the real v1 wire format::

    async with FakeKubelet(directory / "kubelet.sock") as kubelet:
        kubelet.set_pods([
            FakePod("ml", "train-0", [FakeContainer("main", {"nvidia.com/gpu": [uuid]})]),
            FakePod("ml", "train-1", [FakeContainer("main", claims=[
                FakeClaim("train-1-gpu", "ml", [FakeClaimDevice("gpu.nvidia.com", node, "gpu-1")]),
            ])]),
        ])
        kubelet.pad_to(5 * 1024 * 1024)          # a busy node: a reply over 5 MiB
        kubelet.fail_with(grpc.StatusCode.UNAVAILABLE)
        assert kubelet.list_calls == 1

Keep socket paths short (``/tmp/...``): a unix socket path has at most 107 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
import grpc.aio

from gpufleet.exporter.podmap.kubelet_v1 import api_pb2, api_pb2_grpc

__all__ = ["FakeClaim", "FakeClaimDevice", "FakeContainer", "FakeKubelet", "FakePod"]

_MIB = 1024 * 1024


@dataclass(frozen=True)
class FakeClaimDevice:
    """One device a DRA claim was allocated, as the kubelet reports it (a ``ClaimResource``)."""

    driver: str
    pool: str
    device: str
    cdi_devices: Sequence[str] = ()
    """Fully qualified CDI device names, e.g. ``k8s.gpu.nvidia.com/device=gpu-0``."""


@dataclass(frozen=True)
class FakeClaim:
    """One ResourceClaim a container uses (a ``DynamicResource``), with its allocated devices."""

    name: str
    namespace: str
    devices: Sequence[FakeClaimDevice] = ()


@dataclass(frozen=True)
class FakeContainer:
    """One container and what it was allocated."""

    name: str
    devices: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Resource name -> device ids, e.g. ``{"nvidia.com/gpu": ["GPU-…"]}``."""
    cpu_ids: Sequence[int] = ()
    """Exclusive CPUs, as the static CPU manager reports them."""
    claims: Sequence[FakeClaim] = ()
    """DRA claims, reported under ``dynamic_resources`` (the kubelet's DRA feature gate on)."""


@dataclass(frozen=True)
class FakePod:
    """One pod on the fake node."""

    namespace: str
    name: str
    containers: Sequence[FakeContainer] = ()


class FakeKubelet:
    """The kubelet's PodResources gRPC service on ``socket_path``, driven by the test.

    ``set_pods`` decides what List and Get answer, ``set_allocatable`` what
    GetAllocatableResources answers, ``pad_to`` adds filler pods until the List
    reply reaches a size, ``fail_with`` makes every call fail with a status,
    and ``delay`` holds every answer back. ``list_calls``, ``get_calls`` and
    ``allocatable_calls`` count the RPCs received, failed ones included.
    """

    def __init__(self, socket_path: Path, *, max_send_message_bytes: int = 256 * _MIB) -> None:
        self.socket_path = Path(socket_path)
        self.list_calls = 0
        self.get_calls = 0
        self.allocatable_calls = 0
        self.delay = 0.0
        """Seconds every call waits before answering (to run a client into its deadline)."""
        self._max_send = max_send_message_bytes
        self._pods: list[api_pb2.PodResources] = []
        self._filler: list[api_pb2.PodResources] = []
        self._allocatable = api_pb2.AllocatableResourcesResponse()
        self._failure: tuple[grpc.StatusCode, str] | None = None
        self._server: grpc.aio.Server | None = None

    async def __aenter__(self) -> FakeKubelet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on the socket, replacing a stale socket file as the kubelet does."""
        if self._server is not None:
            raise RuntimeError(f"fake kubelet on {self.socket_path} is already running")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = grpc.aio.server(
            options=[
                # The real kubelet sends replies of any size; the client's
                # receive limit is what is under test, not the server's.
                ("grpc.max_send_message_length", self._max_send),
                ("grpc.max_receive_message_length", 4 * _MIB),
            ]
        )
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]
        if server.add_insecure_port(f"unix://{self.socket_path}") == 0:
            raise RuntimeError(f"fake kubelet could not listen on {self.socket_path}")
        await server.start()
        self._server = server

    async def stop(self, *, leave_socket: bool = False) -> None:
        """Stop serving at once; gRPC removes the socket file.

        ``leave_socket=True`` puts a dead socket file back in its place, as a
        killed kubelet leaves it, so that clients get "connection refused"
        rather than "no such file".
        """
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=None)
        if leave_socket and not self.socket_path.exists():
            with socket.socket(socket.AF_UNIX) as dead:
                dead.bind(str(self.socket_path))

    # --- what it answers ------------------------------------------------------

    def set_pods(self, pods: Iterable[FakePod]) -> None:
        """Replace the pods that List and Get report (filler from `pad_to` stays)."""
        self._pods = [_pod_message(pod) for pod in pods]

    def set_allocatable(
        self, devices: Mapping[str, Sequence[str]], cpu_ids: Sequence[int] = ()
    ) -> None:
        """What GetAllocatableResources reports: resource name -> device ids."""
        self._allocatable = api_pb2.AllocatableResourcesResponse(
            devices=[_devices_message(name, ids) for name, ids in devices.items()],
            cpu_ids=list(cpu_ids),
        )

    def pad_to(self, min_bytes: int) -> int:
        """Add filler pods until the serialized List reply is at least ``min_bytes``.

        The filler looks like a busy node: pods with exclusive CPUs, NUMA-pinned
        memory and a non-GPU device each, so it also exercises the client's
        filtering. Returns the reply's size in bytes. ``pad_to(0)`` removes it.
        """
        self._filler = []
        base = self.list_response().ByteSize()
        if min_bytes > base:
            one = _filler_pod(0).ByteSize() + 4  # the field tag and length prefix
            count = math.ceil((min_bytes - base) / one)
            self._filler = [_filler_pod(i) for i in range(count)]
        size: int = self.list_response().ByteSize()
        while size < min_bytes:  # the estimate may fall a few bytes short
            self._filler.append(_filler_pod(len(self._filler)))
            size = self.list_response().ByteSize()
        return size

    def list_response(self) -> api_pb2.ListPodResourcesResponse:
        """The reply List sends now (a new message: changing it changes nothing)."""
        return api_pb2.ListPodResourcesResponse(pod_resources=[*self._pods, *self._filler])

    def fail_with(self, code: grpc.StatusCode | None, details: str = "") -> None:
        """Fail every call with ``code`` from now on; ``None`` answers normally again."""
        if code is None:
            self._failure = None
        else:
            self._failure = (code, details or f"fake kubelet answers {code.name}")

    # --- called by the servicer ----------------------------------------------

    async def _before_reply(self, context: grpc.aio.ServicerContext) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._failure is not None:
            code, details = self._failure
            await context.abort(code, details)

    def _find(self, namespace: str, name: str) -> api_pb2.PodResources | None:
        for pod in self._pods:
            if pod.namespace == namespace and pod.name == name:
                return pod
        return None


class _Servicer(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self._kubelet = kubelet

    async def List(
        self, request: api_pb2.ListPodResourcesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListPodResourcesResponse:
        self._kubelet.list_calls += 1
        await self._kubelet._before_reply(context)
        return self._kubelet.list_response()

    async def GetAllocatableResources(
        self, request: api_pb2.AllocatableResourcesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.AllocatableResourcesResponse:
        self._kubelet.allocatable_calls += 1
        await self._kubelet._before_reply(context)
        reply = api_pb2.AllocatableResourcesResponse()
        reply.CopyFrom(self._kubelet._allocatable)
        return reply

    async def Get(
        self, request: api_pb2.GetPodResourcesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GetPodResourcesResponse:
        self._kubelet.get_calls += 1
        await self._kubelet._before_reply(context)
        pod = self._kubelet._find(request.pod_namespace, request.pod_name)
        if pod is None:
            # The kubelet returns a plain error here, which gRPC sends as UNKNOWN.
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
            )
        return api_pb2.GetPodResourcesResponse(pod_resources=pod)


def _devices_message(resource_name: str, ids: Sequence[str]) -> api_pb2.ContainerDevices:
    return api_pb2.ContainerDevices(resource_name=resource_name, device_ids=list(ids))


def _claim_message(claim: FakeClaim) -> api_pb2.DynamicResource:
    return api_pb2.DynamicResource(
        claim_name=claim.name,
        claim_namespace=claim.namespace,
        claim_resources=[
            api_pb2.ClaimResource(
                cdi_devices=[api_pb2.CDIDevice(name=name) for name in device.cdi_devices],
                driver_name=device.driver,
                pool_name=device.pool,
                device_name=device.device,
            )
            for device in claim.devices
        ],
    )


def _pod_message(pod: FakePod) -> api_pb2.PodResources:
    return api_pb2.PodResources(
        namespace=pod.namespace,
        name=pod.name,
        containers=[
            api_pb2.ContainerResources(
                name=container.name,
                devices=[_devices_message(n, ids) for n, ids in container.devices.items()],
                cpu_ids=list(container.cpu_ids),
                dynamic_resources=[_claim_message(claim) for claim in container.claims],
            )
            for container in pod.containers
        ],
    )


def _filler_pod(index: int) -> api_pb2.PodResources:
    numa = api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=index % 2)])
    containers = [
        api_pb2.ContainerResources(
            name=name,
            devices=[
                api_pb2.ContainerDevices(
                    resource_name="example.com/sriov-vf",
                    device_ids=[f"0000:3b:{index % 256:02x}.{slot}" for slot in range(2)],
                    topology=numa,
                )
            ],
            cpu_ids=list(range(64 * (index % 2), 64 * (index % 2) + 32)),
            memory=[
                api_pb2.ContainerMemory(memory_type="memory", size=32 << 30, topology=numa),
                api_pb2.ContainerMemory(memory_type="hugepages-1Gi", size=8 << 30, topology=numa),
            ],
        )
        for name in ("worker", "log-shipper")
    ]
    return api_pb2.PodResources(
        namespace="batch",
        name=f"etl-nightly-ingest-{index:06d}-7f9c4d8b6-x2k9q",
        containers=containers,
    )
