"""Stop a long-running command on SIGTERM or SIGINT, the same way everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(on_signal: Callable[[int], None] | None = None) -> Iterator[asyncio.Event]:
    """An event set by SIGTERM or SIGINT while the block runs; handlers removed after.

    ``on_signal(signum)`` runs first, for work that must react at once (a
    pipeline that should stop waiting on its exporter). Must be entered with an
    event loop running.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def handle(signum: int) -> None:
        if on_signal is not None:
            on_signal(signum)
        stop.set()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, handle, signum)
    try:
        yield stop
    finally:
        for signum in STOP_SIGNALS:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
