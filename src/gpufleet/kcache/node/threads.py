"""Blocking work the node process must be able to walk away from: a daemon thread, awaited.

A pull runs for up to ``KCACHE_DEADLINE`` in a thread; SIGTERM must not wait for it. The
store makes abandoning it safe (an entry without its marker never counts), so the only
thing to get right is that the thread neither holds up the loop's shutdown nor touches a
closed loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["in_daemon_thread"]

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a daemon thread of its own, awaited without blocking the loop.

    Not `asyncio.to_thread`: the default executor's threads are joined when the loop shuts
    down, so a pull in flight (up to `KCACHE_DEADLINE`) would hold up a SIGTERM. A pull may
    be abandoned at any point: the store never counts an entry whose marker is missing.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name=getattr(fn, "__qualname__", "pull"), daemon=True).start()
    return await future
