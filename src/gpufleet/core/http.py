"""The HTTP endpoints every gpufleet server exposes: /metrics, /healthz, /readyz.

`/healthz` answers while the process serves requests at all; `/readyz` asks the
feature's own checks (informer synced, sink reachable, provider registered)
whether it can really do its work, so Kubernetes stops routing to it otherwise.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from gpufleet.core.listen import format_address, listen_error

__all__ = ["HealthServer", "ReadinessCheck"]

ReadinessCheck = Callable[[], Awaitable[bool]]
"""An async check: True when ready; False or an exception when not."""


@dataclass(frozen=True)
class _CheckResult:
    ok: bool
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        return {"ok": True} if self.ok else {"ok": False, "error": self.error or "not ready"}


class HealthServer:
    """An aiohttp server with /metrics, /healthz and /readyz; features add routes via `app`.

    With `ssl_context` it serves HTTPS (and, if the context requires client
    certificates, mutual TLS).

    Routes must be added before `start()`, when aiohttp freezes the router.

    `setting` names the flag and variable the port (and host) come from, so a
    port that is taken fails `start()` with one `ListenError` line naming them.
    """

    def __init__(
        self,
        *,
        # All interfaces: a pod's probes and scrapes come from outside the pod.
        host: str = "0.0.0.0",
        port: int,
        registry: CollectorRegistry | None = None,
        check_timeout: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
        setting: str = "metrics port",
    ) -> None:
        if check_timeout <= 0:
            raise ValueError(f"check_timeout must be > 0, got {check_timeout!r}")
        self._host = host
        self._requested_port = port
        self._registry = registry if registry is not None else REGISTRY
        self._check_timeout = check_timeout
        self._ssl_context = ssl_context
        self._setting = setting
        self._checks: dict[str, ReadinessCheck] = {}
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._app = web.Application()
        self._app.router.add_get("/metrics", self._metrics)
        self._app.router.add_get("/healthz", self._healthz)
        self._app.router.add_get("/readyz", self._readyz)

    @property
    def app(self) -> web.Application:
        """The aiohttp application, for a feature to add its own routes."""
        return self._app

    @property
    def port(self) -> int:
        """The port actually bound; differs from the one asked for when that was 0."""
        if self._port is None:
            raise RuntimeError("HealthServer is not started")
        return self._port

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        """Register `check` under `name`; /readyz is ready only when every check passes."""
        if name in self._checks:
            raise ValueError(f"readiness check {name!r} is already registered")
        self._checks[name] = check

    async def start(self) -> None:
        """Bind and start serving; returns once the socket is listening.

        Raises `ListenError` (a `ConfigError`) when the address cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError("HealthServer is already started")
        runner = web.AppRunner(self._app)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, self._host, self._requested_port, ssl_context=self._ssl_context
            )
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            address = format_address(self._host, self._requested_port)
            raise listen_error(self._setting, address, exc) from exc
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop serving and release the socket; safe to call when not started."""
        runner, self._runner = self._runner, None
        self._port = None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        # Collectors snapshot state at scrape time and are cheap, so render on the loop
        # rather than race the loop's own objects from a thread.
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        names = list(self._checks)
        results = await asyncio.gather(*(self._run_check(self._checks[name]) for name in names))
        ready = all(result.ok for result in results)
        body = {
            "ready": ready,
            "checks": {name: result.as_json() for name, result in zip(names, results, strict=True)},
        }
        return web.json_response(body, status=200 if ready else 503)

    async def _run_check(self, check: ReadinessCheck) -> _CheckResult:
        deadline = asyncio.timeout(self._check_timeout)
        try:
            async with deadline:
                ok = await check()
        except Exception as error:
            # A failing check means "not ready", never a 500 from the probe endpoint.
            if deadline.expired():
                return _CheckResult(False, f"timed out after {self._check_timeout:g}s")
            return _CheckResult(False, f"{type(error).__name__}: {error}")
        return _CheckResult(True) if ok else _CheckResult(False, "check returned false")
