"""``KubeApiDouble``: a Kubernetes API server on loopback for the real client.

Usage::

    async with KubeApiDouble() as api:
        api.add_node("node-1", provider_id="aws:///us-east-1a/i-0abc")
        api.add_pod("gpu", "plugin-1", node_name="node-1", labels={"app": "nvidia-device-plugin"})
        async with ApiClient(api.client_configuration()) as client:
            core = CoreV1Api(client)
            pods = await core.list_namespaced_pod("gpu", label_selector="app=nvidia-device-plugin")
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import kmock
import yaml
from kubernetes_asyncio.client import Configuration

from gpufleet.gpu.sim import SimFleet
from tests.doubles.kubeapi._authz import Authorizer
from tests.doubles.kubeapi._cluster import ClusterObjects
from tests.doubles.kubeapi._core import CORE_KINDS
from tests.doubles.kubeapi._crd import CRDS
from tests.doubles.kubeapi._discovery import KmockHandler, discovery_info
from tests.doubles.kubeapi._dra import (
    NVIDIA_GPU_DRIVER,
    RESOURCE_SLICE_VERSIONS,
    gpu_slice_devices,
    new_resource_slice,
)
from tests.doubles.kubeapi._exec import ExecHandler, SmiRenderer, default_handler
from tests.doubles.kubeapi._http import ApiFront, RecordedRequest
from tests.doubles.kubeapi._objects import (
    LEASES,
    NODES,
    PODS,
    RESOURCE_SLICES,
    SUBJECT_ACCESS_REVIEWS,
    JsonObject,
    ResourceType,
    new_node,
    new_pod,
    set_ready,
)
from tests.doubles.kubeapi._store import Store, StoreBackup


class KubeApiDouble(ClusterObjects):
    """An API server double for pods, nodes, leases and ResourceSlices, with exec into GPU nodes.

    Also Secrets, Events, Namespaces, ServiceAccounts, SubjectAccessReviews and
    custom resources declared by CRDs (see `ClusterObjects`).

    ``bookmark_interval`` is how often watches that allow bookmarks get one
    (seconds); ``history_limit`` is how many past events a watch can resume
    from before it gets 410 Gone, as etcd compaction would give it.
    ``resource_slice_versions`` are the ``resource.k8s.io`` versions that serve
    ResourceSlices (all three by default, as Kubernetes 1.34; ``("v1beta1",)``
    is a 1.32 server, ``()`` one without DRA): any other version answers 404.
    """

    def __init__(
        self,
        *,
        bookmark_interval: float = 1.0,
        history_limit: int = 100_000,
        resource_slice_versions: Sequence[str] = RESOURCE_SLICE_VERSIONS,
    ) -> None:
        unknown = set(resource_slice_versions) - set(RESOURCE_SLICE_VERSIONS)
        if unknown:
            raise ValueError(
                f"ResourceSlices are not served at {sorted(unknown)}; "
                f"choose from {list(RESOURCE_SLICE_VERSIONS)}"
            )
        served: list[ResourceType] = [PODS, NODES, LEASES, *CORE_KINDS, CRDS]
        served += [RESOURCE_SLICES.served_as(v) for v in dict.fromkeys(resource_slice_versions)]
        served.append(SUBJECT_ACCESS_REVIEWS)
        self.resource_slice_versions = tuple(dict.fromkeys(resource_slice_versions))
        """The versions that serve ResourceSlices, as given."""
        self._store = Store(history_limit=history_limit)
        for kind in (*CORE_KINDS, CRDS):
            self._store.register(kind)
        self._store.listeners.append(self._on_commit)
        self._crd_served = {}
        self._authorizer = Authorizer()
        self._stopping = asyncio.Event()
        self._smi = SmiRenderer()
        self._default_exec = default_handler(self._smi)
        self._exec_handler: ExecHandler | None = None
        self._front = ApiFront(
            self._store,
            served=served,
            exec_handler=lambda: self._exec_handler or self._default_exec,
            authorizer=self._authorizer,
            bookmark_interval=bookmark_interval,
            stopping=self._stopping,
        )
        self.kmock = KmockHandler(front=self._front)
        """kmock's handler: add reactions for paths the double does not emulate."""
        for resource in served:
            key = f"{resource.api_version}/{resource.plural}"
            self.kmock.resources[key] = discovery_info(resource)
        self._server: kmock.Server | None = None
        self.url = ""

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Listen on a random loopback port; ``url`` is set from here on."""
        if self._server is not None:
            raise RuntimeError("KubeApiDouble is already started")
        self._stopping.clear()
        await self.kmock.__aenter__()
        server = kmock.Server(self.kmock)
        await server.__aenter__()
        self._server = server
        self.url = f"http://{server.host}:{server.port}"

    async def stop(self) -> None:
        """End open watches and execs, then close the server.

        kmock's server hooks aiohttp's resolver; stop doubles (and other kmock
        servers) in the reverse order of starting them.
        """
        if self._server is None:
            return
        self._stopping.set()
        self._store.drop_watches()
        server, self._server = self._server, None
        try:
            await server.__aexit__(None, None, None)
        finally:
            await self.kmock.__aexit__(None, None, None)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- client configuration ---------------------------------------------------

    def client_configuration(self) -> Configuration:
        """A kubernetes_asyncio configuration for ``url``: plain HTTP, no auth."""
        if not self.url:
            raise RuntimeError("start the double before asking for its configuration")
        configuration = Configuration(host=self.url)
        configuration.verify_ssl = False
        return configuration

    def write_kubeconfig(self, path: Path) -> Path:
        """Write a kubeconfig whose current context points at ``url``; returns ``path``."""
        if not self.url:
            raise RuntimeError("start the double before writing a kubeconfig")
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "double", "user": {"token": "double-token"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "double"}}],
            "current-context": "double",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # --- objects -------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        *,
        provider_id: str = "",
        system_uuid: str = "",
        labels: dict[str, str] | None = None,
    ) -> JsonObject:
        """Create a Ready node; returns a copy of it as stored."""
        node = new_node(name, provider_id=provider_id, system_uuid=system_uuid, labels=labels or {})
        return _copy(self._store.create(NODES, None, node))

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        node_name: str,
        labels: dict[str, str],
        ready: bool = True,
        phase: str = "Running",
        containers: Sequence[str] = ("nvidia-device-plugin",),
        uid: str | None = None,
    ) -> JsonObject:
        """Create a pod bound to ``node_name``; returns a copy of it as stored."""
        pod = new_pod(
            namespace,
            name,
            node_name=node_name,
            labels=labels,
            ready=ready,
            phase=phase,
            containers=containers,
        )
        if uid is not None:
            pod["metadata"]["uid"] = uid
        return _copy(self._store.create(PODS, namespace, pod, keep_uid=True))

    def set_pod_ready(self, namespace: str, name: str, ready: bool) -> JsonObject:
        """Flip every container's ``ready`` and the Ready/ContainersReady conditions."""
        return self.update_pod(namespace, name, lambda pod: set_ready(pod, ready))

    def update_pod(
        self, namespace: str, name: str, mutate: Callable[[JsonObject], None]
    ) -> JsonObject:
        """Apply ``mutate`` to a copy of the pod and store it (one MODIFIED event)."""
        return _copy(self._store.mutate(PODS, namespace, name, mutate))

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete the pod at once; watchers get DELETED."""
        self._store.delete(PODS, namespace, name)

    def add_resource_slice(
        self,
        name: str,
        *,
        node_name: str,
        devices: Sequence[JsonObject],
        driver: str = NVIDIA_GPU_DRIVER,
        pool: str | None = None,
        generation: int = 1,
    ) -> JsonObject:
        """Publish a ResourceSlice of ``node_name``, as a DRA driver does; returns a copy.

        ``devices`` are in the ``v1`` shape (see `slice_device` and
        `gpu_slice_devices`); a client of ``v1beta1`` sees them under
        ``basic``. The pool is named after the node unless ``pool`` says
        otherwise, as NVIDIA's driver names it.
        """
        obj = new_resource_slice(
            name,
            node_name=node_name,
            driver=driver,
            pool=pool if pool is not None else node_name,
            devices=devices,
            generation=generation,
        )
        return _copy(self._store.create(RESOURCE_SLICES, None, obj))

    def add_gpu_resource_slice(
        self, node_name: str, fleet: SimFleet, *, name: str | None = None
    ) -> JsonObject:
        """Publish the slice NVIDIA's DRA driver would publish for ``fleet`` on ``node_name``.

        Whole GPUs are ``gpu-<index>``; a GPU in MIG mode is published as its
        MIG devices instead. Each carries its NVML UUID as attribute ``uuid``.
        """
        return self.add_resource_slice(
            name or f"{node_name}-{NVIDIA_GPU_DRIVER}-gpus",
            node_name=node_name,
            devices=gpu_slice_devices(fleet),
        )

    def update_resource_slice(self, name: str, mutate: Callable[[JsonObject], None]) -> JsonObject:
        """Apply ``mutate`` to a copy of the slice (``v1`` shape) and store it (one MODIFIED)."""
        return _copy(self._store.mutate(RESOURCE_SLICES, None, name, mutate))

    def delete_resource_slice(self, name: str) -> None:
        """Delete the slice; watchers get DELETED."""
        self._store.delete(RESOURCE_SLICES, None, name)

    def get(self, kind: str, namespace: str | None, name: str) -> JsonObject | None:
        """A copy of a stored object: ``pods``, ``nodes``, ``leases``, ``resourceslices`` (v1),
        ``secrets`` …, or a custom resource's ``plural.group`` (its storage version)."""
        obj = self._store.get(self._resource(kind), namespace, name)
        return None if obj is None else _copy(obj)

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out."""
        return self._store.resource_version

    # --- exec ----------------------------------------------------------------------

    def set_exec_handler(self, handler: ExecHandler | None) -> None:
        """Answer exec with ``handler``; ``None`` restores the simulated ``nvidia-smi``."""
        self._exec_handler = handler

    def set_node_fleet(self, node_name: str, fleet: SimFleet | str) -> None:
        """The simulated GPUs behind ``nvidia-smi`` on ``node_name`` (a preset name or fleet)."""
        self._smi.set_fleet(node_name, fleet)

    async def prerender_smi(self, node_names: Iterable[str] | None = None) -> None:
        """Render ``nvidia-smi -q -x`` for these nodes (default: every node and pod node) now.

        The default exec handler renders a node's document on its first exec
        (2-4 ms of CPU on the event loop) and caches it; benchmarks call this
        first so that cost stays out of the timed part.
        """
        if node_names is None:
            node_names = self._store.node_names()
        await self._smi.prerender(node_names)

    # --- faults --------------------------------------------------------------------

    def expire_history(self) -> None:
        """Resuming a watch (or a paginated list) from any older resourceVersion answers 410."""
        self._store.expire_history()

    def backup(self) -> StoreBackup:
        """Save every object and the version counter, as an etcd snapshot does."""
        return self._store.backup()

    def restore(self, backup: StoreBackup) -> None:
        """Restore ``backup`` as an etcd restore does: resourceVersions go backwards.

        Every open watch ends and the history is gone. The version counter
        goes on from the backup's, so a watch or list at a version handed out
        since answers 504 "Too large resource version", and later writes get
        versions that were already handed out to others.
        """
        self._store.restore(backup)

    def drop_watches(self) -> None:
        """End every open watch stream; clients see the stream end, as on a server restart."""
        self._store.drop_watches()

    # --- accounting ----------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, in arrival order, including watches and execs."""
        return self._front.requests

    def count(
        self,
        *,
        verb: str | None = None,
        resource: str | None = None,
        subresource: str | None = None,
    ) -> int:
        """How many recorded requests match every given filter."""
        return sum(
            1
            for r in self._front.requests
            if (verb is None or r.verb == verb)
            and (resource is None or r.resource == resource)
            and (subresource is None or r.subresource == subresource)
        )

    def etcd_list_count(self, resource: str | None = None) -> int:
        """Lists that a real API server reads from etcd rather than its watch cache.

        ``resourceVersion=0`` is served from the watch cache (any version,
        possibly a little stale), and so is ``resourceVersion=N`` without a
        ``limit``. A list without a version is a consistent read of etcd, and
        a paginated one (``limit``) at a version other than 0 is a read of
        etcd at that exact revision (up to Kubernetes 1.33, whose cache
        serves no such list). This counts those lists, not their ``continue``
        pages.
        """
        return sum(
            1
            for r in self._front.requests
            if r.verb == "list"
            and (resource is None or r.resource == resource)
            and not r.params.get("continue")
            and (
                not r.params.get("resourceVersion")
                or (r.params["resourceVersion"] != "0" and _int_or_zero(r.params.get("limit")) > 0)
            )
        )

    def exec_count(self, pod_uid: str | None = None) -> int:
        """Exec requests in all (refused ones too), or those that reached the pod ``pod_uid``."""
        if pod_uid is None:
            return self.count(verb="exec")
        return self._front.exec_by_uid[pod_uid]


def _int_or_zero(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _copy(obj: JsonObject) -> JsonObject:
    # Stored objects are shared with watch history and list snapshots; hand out copies.
    copied: JsonObject = json.loads(json.dumps(obj))
    return copied
