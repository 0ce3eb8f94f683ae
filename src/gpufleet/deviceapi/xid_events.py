"""The provider's XID thread: NVML's blocking event wait, kept off the event loop.

``nvmlEventSetWait`` blocks, so it runs in a dedicated thread that hands each
event to the loop. The wait is bounded by ``XID_POLL_S``, so the thread sees a
stop within one poll. A broken event set is a broken set, not a broken GPU: it
is closed and recreated with backoff, and nobody is marked unhealthy for it.
What an XID means for a GPU is ``tracking``; recording it is ``provider``.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from gpufleet.core.retry import Backoff
from gpufleet.gpu.model import XidEvent
from gpufleet.gpu.source import GpuError, GpuSource, XidEventStream

__all__ = ["XID_POLL_S", "pump_xid_events"]

_log = logging.getLogger("gpufleet.deviceapi.provider")
"""The provider's logger: these lines are the provider's, whichever module says them."""

XID_POLL_S = 0.5
"""How long one ``nvmlEventSetWait`` blocks: the XID thread checks for stop this often."""


def pump_xid_events(
    source: GpuSource,
    backoff: Backoff,
    loop: asyncio.AbstractEventLoop,
    events: asyncio.Queue[XidEvent],
    halt: threading.Event,
    ready: threading.Event,
) -> None:
    """Put ``source``'s XID events on ``events`` (in ``loop``) until ``halt`` is set.

    The body of the XID thread: blocks in ``nvmlEventSetWait`` and recreates
    the event set on errors. ``ready`` is set while an event set is
    registered (events before that are not seen).
    """
    stream: XidEventStream | None = None
    attempt = 0
    try:
        while not halt.is_set():
            if stream is None:
                try:
                    stream = source.xid_events()
                except GpuError as exc:
                    delay = backoff.delay(attempt)
                    attempt += 1
                    _log.error(
                        "cannot register for XID events",
                        extra={"error": str(exc), "retry_in_s": round(delay, 3)},
                    )
                    halt.wait(delay)
                    continue
                ready.set()
            try:
                event = stream.wait(XID_POLL_S)
            except Exception as exc:
                # A broken event set, not a broken GPU: recreate it, mark nobody dead.
                ready.clear()
                delay = backoff.delay(attempt)
                attempt += 1
                _log.warning(
                    "XID event wait failed; recreating the event set",
                    extra={"error": str(exc), "retry_in_s": round(delay, 3)},
                )
                _close_quietly(stream)
                stream = None
                halt.wait(delay)
                continue
            attempt = 0
            if event is not None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:
                    return  # the loop is closed: the provider is gone
    finally:
        ready.clear()
        if stream is not None:
            _close_quietly(stream)


def _close_quietly(stream: XidEventStream) -> None:
    try:
        stream.close()
    except Exception as exc:
        _log.warning("closing the XID event set failed", extra={"error": str(exc)})
