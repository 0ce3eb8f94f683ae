"""Waiting in tests for something that happens in the background."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll until `condition()` holds; fail after `limit` seconds (a hang, not a timing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            pytest.fail("condition not reached")
        await asyncio.sleep(0.01)
