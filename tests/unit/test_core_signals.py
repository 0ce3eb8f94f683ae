"""SIGTERM sets the stop event, runs the callback first, and the handler goes away after."""

from __future__ import annotations

import asyncio
import os
import signal

from gpufleet.core.signals import stop_on_signals


async def test_sigterm_sets_the_event_after_the_callback_ran() -> None:
    seen: list[tuple[int, bool]] = []
    with stop_on_signals(lambda signum: seen.append((signum, stop.is_set()))) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
    assert seen == [(signal.SIGTERM, False)]


async def test_the_handler_is_removed_when_the_block_ends() -> None:
    with stop_on_signals():
        pass
    loop = asyncio.get_running_loop()
    assert not loop.remove_signal_handler(signal.SIGTERM)
