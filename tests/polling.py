"""Waiting in tests for something that happens in the background."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import pytest


class _Collector(Protocol):
    def latest_snapshot(self) -> Any: ...


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll until `condition()` holds; fail after `limit` seconds (a hang, not a timing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            pytest.fail("condition not reached")
        await asyncio.sleep(0.01)


def wait_until(condition: Callable[[], bool], limit: float, what: str) -> None:
    """Poll until `condition()` holds, from sync code (threads, subprocesses).

    Fails after `limit` seconds as a hang guard, not a timing: pick a limit
    far beyond what the awaited thing ever takes, and say in `what` what it is.
    """
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} never happened within {limit} s")
        time.sleep(0.01)


async def next_snapshot(collector: _Collector, limit: float = 10.0) -> Any:
    """The GPU exporter's first snapshot from a collection that started after this call.

    The collection in flight may have started before the change being
    waited for, so this waits for two new snapshots. Fails as a hang after
    ``limit`` seconds for each.
    """
    before = collector.latest_snapshot()
    for _ in range(2):
        async with asyncio.timeout(limit):
            while collector.latest_snapshot() is before:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        before = collector.latest_snapshot()
    return before
