"""An HTTP ingest endpoint for the HTTP exporter's tests: a real aiohttp server on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

__all__ = ["ingest_endpoint"]


@contextlib.asynccontextmanager
async def ingest_endpoint(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *,
    client_max_size: int = 1024**2,
) -> AsyncIterator[str]:
    """A real aiohttp server on a loopback port whose /ingest calls ``handle``; yields its URL.

    ``client_max_size`` is aiohttp's body limit: a larger body gets a 413.
    """
    app = web.Application(client_max_size=client_max_size)
    app.router.add_route("*", "/ingest", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/ingest"
    finally:
        await runner.cleanup()
