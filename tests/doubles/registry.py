"""Registry doubles: a docker-registry behind bearer-token auth, and a recording transport.

`running_token_registry` starts a real docker-registry (the test servers'
binary) configured for ``auth.token``, next to a small aiohttp `TokenService`
that signs ES256 JWTs with an ``x5c`` header; the registry checks them against
the service's self-signed certificate (its ``rootcertbundle``), so the client's
token flow runs end to end. The `token_registry` fixture in tests/conftest.py
starts one per test. `RecordingTransport` is httpx's real transport keeping
every URL it sends, queries included.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.doubles.certificates import self_signed

__all__ = ["RecordingTransport", "TokenRegistry", "TokenService", "running_token_registry"]


class RecordingTransport(httpx.HTTPTransport):
    """The real transport, keeping every URL sent, queries included (`requests` drops them)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[httpx.URL] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Keep the URL, then send the request as httpx would."""
        self.urls.append(request.url)
        return super().handle_request(request)


@dataclass
class TokenService:
    """Issues ES256 JWTs the registry trusts: every action to known users, pull to anyone."""

    users: dict[str, str]
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    token_field: str = "token"
    seen: list[tuple[list[str], str | None]] = field(default_factory=list)
    """(scopes, user or None) of every token request."""

    def __post_init__(self) -> None:
        self._cert = self.certificate()

    def certificate(self) -> x509.Certificate:
        """A self-signed CA certificate for `key`, valid for a day."""
        return self_signed("gpufleet test token service", key=self.key).certificate

    def token(self, scopes: list[str], user: str | None) -> str:
        """A signed JWT granting `scopes` (only their pull for anyone but a known user)."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = [a for a in actions.split(",") if user is not None or a == "pull"]
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        cert = self._cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(cert).decode()]}
        claims = {
            "iss": "gpufleet-test-issuer", "sub": user or "", "aud": "gpufleet-test-registry",
            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex,
            "access": access,
        }  # fmt: skip
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    async def handle(self, request: web.Request) -> web.Response:
        """Answer ``GET /token``: 401 for a wrong password, else a token, recorded in `seen`."""
        scopes = request.query.getall("scope", [])
        user = None
        header = request.headers.get("Authorization", "")
        if header:
            name, _, password = (
                base64.b64decode(header.removeprefix("Basic ")).decode().partition(":")
            )
            if self.users.get(name) != password:
                return web.json_response({"details": "bad credentials"}, status=401)
            user = name
        self.seen.append((scopes, user))
        return web.json_response({self.token_field: self.token(scopes, user)})

    def pem(self) -> bytes:
        """The certificate the registry trusts tokens from (its rootcertbundle)."""
        return self._cert.public_bytes(serialization.Encoding.PEM)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TokenRegistry:
    """A running token-auth registry: its ``host:port``, and the service that signs its tokens."""

    address: str
    service: TokenService


async def _wait_listening(port: int, process: asyncio.subprocess.Process, log: Path) -> None:
    for _ in range(200):
        if process.returncode is not None:
            pytest.fail(f"docker-registry exited: {_tail(log)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    pytest.fail(f"docker-registry does not listen on {port}: {_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text()[-4000:]


@contextlib.asynccontextmanager
async def running_token_registry(binary: str, state: Path) -> AsyncIterator[TokenRegistry]:
    """A real docker-registry demanding Bearer tokens from a TokenService on loopback.

    ``binary`` is docker-registry; its config, storage and log go under ``state``.
    """
    service = TokenService(users={"alice": "wonderland"})
    app = web.Application()
    app.router.add_get("/token", service.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    token_socket = socket.socket()
    token_socket.bind(("127.0.0.1", 0))
    await web.SockSite(runner, token_socket).start()
    token_port = token_socket.getsockname()[1]
    (state / "root.pem").write_bytes(service.pem())
    port = _free_port()
    (state / "config.yml").write_text(
        f"""version: 0.1
log: {{level: info}}
storage:
  filesystem: {{rootdirectory: {state}/data}}
  delete: {{enabled: true}}
  redirect: {{disable: true}}
http: {{addr: 127.0.0.1:{port}}}
auth:
  token:
    realm: http://127.0.0.1:{token_port}/token
    service: gpufleet-test-registry
    issuer: gpufleet-test-issuer
    rootcertbundle: {state}/root.pem
"""
    )
    log_path = state / "registry.log"
    with log_path.open("wb") as log:
        # A clean environment: docker-registry reads REGISTRY_* variables as config overrides.
        process = await asyncio.create_subprocess_exec(
            binary, "serve", str(state / "config.yml"),
            env={"PATH": "/usr/bin:/bin"}, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        await _wait_listening(port, process, log_path)
        yield TokenRegistry(f"127.0.0.1:{port}", service)
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        await runner.cleanup()
