"""The ``GpuSource`` protocol: the one small interface every GPU backend implements.

Like httpx's transports, the real backend (NVML on a GPU node) and the simulated
one (``gpufleet.gpu.sim`` behind the same ``NvmlSource``) are interchangeable, so
features are tested by running their real code against simulated GPUs.

Every method is blocking (NVML is a C library); async callers run them in a
worker thread with ``asyncio.to_thread``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gpufleet.core.errors import GpufleetError
from gpufleet.gpu.model import DeviceList, GpuProcess, GpuSample, XidEvent


class GpuError(GpufleetError):
    """A GPU backend failed (driver missing, library error, unreadable GPU)."""


class GpuLostError(GpuError):
    """The named GPU fell off the bus; the others may still be fine."""

    def __init__(self, uuid: str, message: str = "GPU is lost") -> None:
        super().__init__(f"{uuid}: {message}")
        self.uuid = uuid


class XidEventStream(Protocol):
    """A registration for XID events on every GPU of the source."""

    def wait(self, timeout_s: float) -> XidEvent | None:
        """Block until the next XID event, or return ``None`` after ``timeout_s``."""
        ...

    def close(self) -> None:
        """Release the registration."""
        ...


@runtime_checkable
class GpuSource(Protocol):
    """Where GPU facts come from."""

    def devices(self) -> DeviceList:
        """Enumerate the GPUs; unreadable GPUs come back as faults, not exceptions."""
        ...

    def sample(self, uuid: str) -> GpuSample:
        """Read the telemetry of one GPU; raises ``GpuLostError`` if it is lost."""
        ...

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        """List the compute processes on one GPU and its MIG instances."""
        ...

    def xid_events(self) -> XidEventStream:
        """Register for XID (critical error) events on every readable GPU."""
        ...

    def close(self) -> None:
        """Release the backend (``nvmlShutdown``)."""
        ...
