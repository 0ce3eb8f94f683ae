"""What the provider knows about each of its GPUs, and the ``Healthy`` verdict it draws.

The provider's health logic, with no I/O: ``TrackedGpu`` holds the facts about
one GPU (lost, unreadable, latched critical XIDs, pending page retirement, a
failed row remap, the recent XIDs) and turns them into a ``HealthVerdict``,
worst reason first; a health sample or an XID event updates those facts.
``TrackedGpus`` is the set of GPUs one provider registers, built from GPU
enumerations, including the faults that could not tell their UUID and are
matched to the objects an earlier run registered.

The rules themselves (order of reasons, latching) are described in
``provider``'s docstring; how a verdict is merged into a server's status is
``health``; writing it is ``registration``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.deviceapi.health import HEALTHY, MAX_LAST_XIDS, HealthVerdict, to_timestamp
from gpufleet.deviceapi.naming import gpu_labels, gpu_name
from gpufleet.deviceapi.v1alpha1.gpu_pb2 import Gpu, GpuSpec, XidRecord
from gpufleet.gpu.model import DeviceList, FaultKind, GpuDevice, GpuFault, GpuSample, XidEvent
from gpufleet.gpu.source import GpuError, GpuLostError
from gpufleet.gpu.xid import Action, Severity, XidInfo

__all__ = ["TrackedGpu", "TrackedGpus"]

_log = logging.getLogger("gpufleet.deviceapi.provider")
"""The provider's logger: these lines are the provider's, whichever module says them."""


@dataclass(slots=True)
class TrackedGpu:
    """The provider's in-memory truth about one GPU: re-applied after a server restart."""

    name: str
    uuid: str
    spec: GpuSpec
    labels: dict[str, str]
    complete: bool = True
    """False when the GPU was a fault at enumeration: the spec holds what was known."""
    lost: bool = False
    unreadable: str | None = None
    latched: dict[int, XidInfo] = field(default_factory=dict)
    """Critical XIDs seen since the provider started (see "Latching")."""
    retired_pages_pending: bool = False
    row_remap_failure: bool = False
    xids: deque[XidRecord] = field(default_factory=lambda: deque(maxlen=MAX_LAST_XIDS))
    registered: bool = False

    def verdict(self) -> HealthVerdict:
        """The ``Healthy`` condition and action from everything known (worst reason first)."""
        problems: list[tuple[str, str, Action]] = []
        if self.lost:
            problems.append(
                ("GpuLost", f"GPU {self.uuid} is lost (unreachable)", Action.REBOOT_NODE)
            )
        for info in sorted(self.latched.values(), key=lambda item: item.xid):
            problems.append(("XidCritical", f"XID {info.xid}: {info.description}", info.action))
        if self.row_remap_failure:
            problems.append(
                ("RowRemapFailure", "GPU memory row remapping failed", Action.REPLACE_GPU)
            )
        if self.retired_pages_pending:
            problems.append(
                (
                    "RetiredPagesPending",
                    "retired GPU memory pages take effect after a GPU reset",
                    Action.RESET_GPU,
                )
            )
        if problems:
            action = max((problem[2] for problem in problems), key=lambda item: item.rank)
            message = "; ".join(problem[1] for problem in problems)
            return HealthVerdict("False", problems[0][0], message, action)
        if self.unreadable is not None:
            return HealthVerdict("Unknown", "GpuUnreadable", self.unreadable, Action.NONE)
        return HEALTHY

    def observe(self, result: GpuSample | GpuError) -> None:
        """Take in one periodic health sample (or the error reading it raised)."""
        if isinstance(result, GpuLostError):
            if not self.lost:
                _log.warning("GPU lost", extra={"gpu": self.name, "gpu_uuid": self.uuid})
            self.lost = True
        elif isinstance(result, GpuError):
            # One failed read is not a verdict: keep what we knew, say so once per interval.
            _log.warning("GPU health check failed", extra={"gpu": self.name, "error": str(result)})
        else:
            self.lost = False
            self.unreadable = None
            self.retired_pages_pending = bool(result.retired_pages_pending)
            self.row_remap_failure = bool(result.remapped_rows_failure)

    def record_xid(self, event: XidEvent, info: XidInfo) -> None:
        """Add a non-ignored XID to the history; a critical one latches the GPU unhealthy."""
        self.xids.append(
            XidRecord(
                xid=event.xid, time=to_timestamp(event.timestamp), description=info.description
            )
        )
        if info.severity is Severity.CRITICAL:
            self.latched[event.xid] = info


def _spec_for_device(device: GpuDevice, node: str) -> GpuSpec:
    return GpuSpec(
        uuid=device.uuid,
        serial=device.serial or "",
        product=device.product_name,
        pci_bus_id=device.pci_bus_id,
        index=device.index,
        node=node,
    )


def _spec_for_fault(fault: GpuFault, uuid: str, node: str) -> GpuSpec:
    return GpuSpec(uuid=uuid, pci_bus_id=fault.pci_bus_id or "", index=fault.index, node=node)


class TrackedGpus:
    """The GPUs one provider registers on ``node``, by object name and by UUID.

    ``orphans`` are faults without a UUID, not tracked until ``adopt_orphans``
    finds the object an earlier run registered for them.
    """

    def __init__(self, node: str, provider: str) -> None:
        """Track GPUs of node ``node`` for the provider called ``provider`` (a label value)."""
        self._node = node
        self._provider = provider
        self.by_name: dict[str, TrackedGpu] = {}
        self.by_uuid: dict[str, TrackedGpu] = {}
        self.orphans: list[GpuFault] = []
        """Faults without a UUID: matched to existing objects by index or PCI bus id."""
        self._orphans_reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.by_name)

    @property
    def incomplete(self) -> bool:
        """True while some GPU was a fault at start (re-enumerating may fill it in)."""
        return bool(self.orphans) or any(not t.complete for t in self.by_name.values())

    def adopt(self, listing: DeviceList) -> None:
        """Track what the first enumeration found: its devices and its faults."""
        for device in listing.devices:
            self.track(self._from_device(device))
        for fault in listing.faults:
            if not fault.uuid:
                # A lost GPU usually cannot even tell its UUID; reconcile looks for the
                # object an earlier run registered for this index (or PCI bus id).
                self.orphans.append(fault)
                continue
            tracked = TrackedGpu(
                name=gpu_name(fault.uuid),
                uuid=fault.uuid,
                spec=_spec_for_fault(fault, fault.uuid, self._node),
                labels=gpu_labels(self._node, "", self._provider),
                complete=False,
            )
            _take_fault(tracked, fault)
            self.track(tracked)

    def refresh(self, listing: DeviceList) -> None:
        """Fill in the spec of GPUs that were faults, from a later enumeration.

        A GPU that was unreadable without a UUID and reads again is tracked anew.
        """
        for device in listing.devices:
            tracked = self.by_uuid.get(device.uuid)
            if tracked is not None and not tracked.complete:
                tracked.spec = _spec_for_device(device, self._node)
                tracked.labels = gpu_labels(self._node, device.product_name, self._provider)
                tracked.complete = True
                tracked.registered = False  # the spec on the server needs the update
            elif tracked is None:
                self.orphans = [o for o in self.orphans if o.index != device.index]
                self.track(self._from_device(device))

    def track(self, tracked: TrackedGpu) -> None:
        """Track ``tracked``, unless it is a fault and a complete record exists already."""
        existing = self.by_name.get(tracked.name)
        if existing is not None and existing.complete and not tracked.complete:
            return
        self.by_name[tracked.name] = tracked
        self.by_uuid[tracked.uuid] = tracked

    def adopt_orphans(self, items: Sequence[Gpu]) -> None:
        """Track, as far as the server knows them, GPUs that are faults without a UUID."""
        for fault in list(self.orphans):
            match = next(
                (
                    item
                    for item in items
                    if item.spec.node == self._node
                    and item.metadata.name not in self.by_name
                    and (
                        item.spec.pci_bus_id == fault.pci_bus_id
                        if fault.pci_bus_id
                        else item.spec.index == fault.index
                    )
                ),
                None,
            )
            if match is None:
                if fault.index not in self._orphans_reported:
                    self._orphans_reported.add(fault.index)
                    _log.error(
                        "GPU unreadable and without a UUID: cannot register it",
                        extra={"gpu_index": fault.index, "fault": fault.message},
                    )
                continue
            spec = GpuSpec()
            spec.CopyFrom(match.spec)
            tracked = TrackedGpu(
                name=match.metadata.name,
                uuid=match.spec.uuid,
                spec=spec,
                labels=gpu_labels(self._node, match.spec.product, self._provider),
                complete=False,
                registered=True,
            )
            _take_fault(tracked, fault)
            self.orphans.remove(fault)
            self.track(tracked)
            _log.warning(
                "unreadable GPU matched to its registered object",
                extra={"gpu": tracked.name, "gpu_index": fault.index, "fault": fault.message},
            )

    def _from_device(self, device: GpuDevice) -> TrackedGpu:
        return TrackedGpu(
            name=gpu_name(device.uuid),
            uuid=device.uuid,
            spec=_spec_for_device(device, self._node),
            labels=gpu_labels(self._node, device.product_name, self._provider),
        )


def _take_fault(tracked: TrackedGpu, fault: GpuFault) -> None:
    if fault.kind is FaultKind.LOST:
        tracked.lost = True
    else:
        tracked.unreadable = fault.message
