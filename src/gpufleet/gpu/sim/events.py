"""The driver side of simulated NVML events: event sets, their registrations and queues.

As with the real driver, an event reaches every event set that registered its
GPU for its type before it happened, and ``nvmlEventSetWait`` blocks until one
arrives, the timeout passes or the set is freed. ``SimulatedNvml`` checks the
library state and the device handles; this module keeps the event sets.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pynvml

from gpufleet.gpu.sim.handles import address, device_handle, event_set_handle

SUPPORTED_EVENTS = (
    pynvml.nvmlEventTypeXidCriticalError
    | pynvml.nvmlEventTypeSingleBitEccError
    | pynvml.nvmlEventTypeDoubleBitEccError
    | pynvml.nvmlEventTypePState
    | pynvml.nvmlEventTypeClock
)
"""The event type mask every simulated GPU can deliver."""


@dataclass(slots=True)
class _PendingEvent:
    gpu_index: int
    event_type: int
    data: int
    gpu_instance_id: int
    compute_instance_id: int


@dataclass(slots=True)
class _EventSet:
    registrations: dict[int, int] = field(default_factory=dict)
    """GPU index -> registered event type mask."""
    queue: deque[_PendingEvent] = field(default_factory=deque)
    freed: bool = False


class EventSets:
    """The event sets of one simulated library.

    Thread-safe: ``wait`` blocks in one thread while ``deliver`` is called from
    another. Unknown or freed event sets raise ``NVMLError_InvalidArgument``,
    like NVML.
    """

    def __init__(self) -> None:
        """No event sets yet."""
        self._lock = threading.Condition()
        self._sets: dict[int, _EventSet] = {}
        self._next = 1

    def create(self) -> Any:
        """A new, empty event set, as a ``c_nvmlEventSet_t``."""
        with self._lock:
            handle = event_set_handle(self._next)
            self._next += 1
            self._sets[address(handle)] = _EventSet()
        return handle

    def register(self, event_set: object, gpu_index: int, event_types: int) -> None:
        """Deliver events of ``event_types`` from GPU ``gpu_index`` to ``event_set``."""
        with self._lock:
            registrations = self._find(event_set).registrations
            registrations[gpu_index] = registrations.get(gpu_index, 0) | event_types

    def deliver(
        self,
        gpu_index: int,
        event_type: int,
        data: int,
        gpu_instance_id: int,
        compute_instance_id: int,
    ) -> int:
        """Queue an event on every set registered for it; returns how many sets got it."""
        delivered = 0
        with self._lock:
            for event_set in self._sets.values():
                if event_set.registrations.get(gpu_index, 0) & event_type:
                    event_set.queue.append(
                        _PendingEvent(
                            gpu_index, event_type, data, gpu_instance_id, compute_instance_id
                        )
                    )
                    delivered += 1
            self._lock.notify_all()
        return delivered

    def wait(self, event_set: object, timeout_s: float) -> Any:
        """The next event of ``event_set`` as a ``c_nvmlEventData_t``.

        Raises ``NVMLError_Timeout`` when none came within ``timeout_s``, and
        InvalidArgument when the set is freed while waiting.
        """
        with self._lock:
            found = self._find(event_set)
            self._lock.wait_for(lambda: found.queue or found.freed, timeout_s)
            if found.freed:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if not found.queue:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
            pending = found.queue.popleft()
        data = pynvml.c_nvmlEventData_t()
        data.device = device_handle(pending.gpu_index)
        data.eventType = pending.event_type
        data.eventData = pending.data
        data.gpuInstanceId = pending.gpu_instance_id
        data.computeInstanceId = pending.compute_instance_id
        return data

    def free(self, event_set: object) -> None:
        """Release an event set; a thread waiting on it is woken with InvalidArgument."""
        with self._lock:
            found = self._find(event_set)
            found.freed = True
            del self._sets[address(event_set)]
            self._lock.notify_all()

    def _find(self, event_set: object) -> _EventSet:
        # NVMLError.__new__ maps the code to its subclass (NVMLError_InvalidArgument).
        if not isinstance(event_set, pynvml.c_nvmlEventSet_t):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        found = self._sets.get(address(event_set))
        if found is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return found
