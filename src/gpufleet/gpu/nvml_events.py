"""``NvmlXidEventStream``: XID events from one NVML event set, as an ``XidEventStream``.

``NvmlSource.xid_events`` creates the event set and registers the GPUs; this
object owns the set from then on: it blocks in ``nvmlEventSetWait``, names the
GPU of each event and frees the set on ``close``. Like ``NvmlSource`` it takes
any module with pynvml's surface.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from gpufleet.gpu.model import XidEvent
from gpufleet.gpu.source import GpuError

_log = logging.getLogger(__name__)


def handle_address(handle: Any) -> int:
    """The pointer value of an NVML handle: stable for the life of the library.

    Handles are ctypes pointers, so the address, not the object, says which
    GPU an event names.
    """
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


class NvmlXidEventStream:
    """XID events from one NVML event set (an ``XidEventStream``)."""

    def __init__(
        self,
        nvml: Any,
        event_set: Any,
        uuids: dict[int, str],
        clock: Callable[[], datetime],
    ) -> None:
        """Wrap ``event_set``; ``uuids`` maps each registered handle's address to its UUID."""
        self._nvml = nvml
        self._event_set = event_set
        self._uuids = uuids
        self._clock = clock
        self._closed = False

    @property
    def registered_uuids(self) -> tuple[str, ...]:
        """The GPUs whose XID events this stream receives."""
        return tuple(self._uuids.values())

    def wait(self, timeout_s: float) -> XidEvent | None:
        """Block until the next XID event, or return ``None`` after ``timeout_s``."""
        nvml = self._nvml
        try:
            data = nvml.nvmlEventSetWait(self._event_set, max(0, round(timeout_s * 1000)))
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_TIMEOUT:
                return None
            raise GpuError(f"nvmlEventSetWait: {exc}") from exc
        return XidEvent(
            gpu_uuid=self._uuid_of(data.device), xid=int(data.eventData), timestamp=self._clock()
        )

    def close(self) -> None:
        """Free the event set; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._nvml.nvmlEventSetFree(self._event_set)
        except self._nvml.NVMLError as exc:
            _log.warning("nvmlEventSetFree failed", extra={"nvml_error": str(exc)})

    def _uuid_of(self, device: Any) -> str:
        # The UUID read at registration still names a GPU that has since fallen
        # off the bus (XID 79), when asking NVML again would fail.
        known = self._uuids.get(handle_address(device))
        if known is not None:
            return known
        uuid = self._nvml.nvmlDeviceGetUUID(device)
        return uuid.decode() if isinstance(uuid, bytes) else str(uuid)
