"""Shared fixtures: the real servers started by ``scripts/test-servers.sh``."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from gpufleet.kube.client import Kube, KubeSettings, connect
from tests.doubles.hostile import Handler, HostileServer
from tests.doubles.kubeapi import KubeApiDouble
from tests.doubles.podresources import FakeKubelet
from tests.doubles.registry import TokenRegistry, running_token_registry
from tests.testservers import STATE, read_facts


@pytest.fixture(scope="session")
def test_servers() -> dict[str, str]:
    """KEY=VALUE facts about the running test servers (ports, users, directories)."""
    return read_facts()


def require(servers: dict[str, str], *keys: str) -> list[str]:
    """The values of ``keys``; fails (never skips) when the server is not running."""
    missing = [key for key in keys if key not in servers]
    if missing:
        pytest.fail(
            f"test server facts {', '.join(missing)} missing from {STATE / 'env'}: "
            "run `make test`, or `scripts/test-servers.sh start` before pytest"
        )
    return [servers[key] for key in keys]


@pytest.fixture
async def kube(api: KubeApiDouble) -> AsyncIterator[Kube]:
    """A client of the module's own ``api`` double, with no rate limit to speak of."""
    settings = KubeSettings(qps=1000, burst=1000)
    async with await connect(settings, configuration=api.client_configuration()) as client:
        yield client


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A unix socket path in a fresh directory under /tmp.

    A socket path has at most 107 bytes, and pytest's tmp_path can be longer.
    """
    directory = Path(tempfile.mkdtemp(prefix="gf-sock-", dir="/tmp"))
    try:
        yield directory / "kubelet.sock"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def kubelet(socket_path: Path) -> AsyncIterator[FakeKubelet]:
    """The fake kubelet's PodResources service on ``socket_path``."""
    async with FakeKubelet(socket_path) as fake:
        yield fake


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials and region, and no profile files or instance role from the host."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
async def token_registry(
    test_servers: dict[str, str], tmp_path: Path
) -> AsyncIterator[TokenRegistry]:
    """A real docker-registry demanding Bearer tokens from a TokenService on loopback."""
    (binary,) = require(test_servers, "GPUFLEET_TEST_REGISTRY_BIN")
    async with running_token_registry(binary, tmp_path) as registry:
        yield registry


@pytest.fixture
def hostile_servers() -> Iterator[Callable[..., HostileServer]]:
    """Start hostile servers; all are closed at the end of the test."""
    started: list[HostileServer] = []

    def start(handler: Handler, tls: ssl.SSLContext | None = None) -> HostileServer:
        server = HostileServer(handler, tls)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
