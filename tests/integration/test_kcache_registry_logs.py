"""No credential, token or query string reaches a log line, with every logger at debug.

A full push and pull of a cache image through the session's htpasswd registry (Basic) and a
token registry (Bearer), with gpufleet's JSON logging at debug and httpx and httpcore, which
log whole URLs and response headers, forced to debug as well: the worst a user can configure.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.core.logging import configure_logging
from gpufleet.kcache.image import build_image
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.store import CacheStore
from gpufleet.kcache.transfer import pull_to_store, push_image
from tests.conftest import require
from tests.doubles.registry import TokenRegistry
from tests.kcache_support import write_cache

pytestmark = pytest.mark.integration

LIBRARY_LOGGERS = ("httpx", "httpcore", "httpcore.connection", "httpcore.http11")
# A query string in a URL: `?` then a name=value pair. docker-registry's _state is one.
QUERY = re.compile(r"\?[A-Za-z0-9_.~%-]+=")
AUTH_VALUE = re.compile(r"(?i)\b(?:basic|bearer)\s+(?!<redacted>)[A-Za-z0-9+/=._~-]{6,}")


@pytest.fixture
def debug_logs() -> Iterator[io.StringIO]:
    """Every record of every logger, at debug, as gpufleet's JSON lines."""
    captured = io.StringIO()
    configure_logging("kcache-test", "debug", "json", stream=captured)
    saved = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    # The test's own token service (aiohttp) is the peer, not the code under test: its
    # access log shows the requests it received, queries and all.
    access = logging.getLogger("aiohttp.access")
    saved["aiohttp.access"] = access.level
    access.setLevel(logging.WARNING)
    yield captured
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger().setLevel(logging.WARNING)


def push_and_pull(address: str, user: str, password: str, tmp_path: Path, repo: str) -> None:
    image = build_image(write_cache(tmp_path / "cache"), tmp_path / "work")
    ref = Reference(address, repo, "v1")
    empty = tmp_path / "docker-empty"
    empty.mkdir()
    with RegistryClient(
        address, username=user, password=password, docker_config=empty, chunk_size=4096
    ) as client:  # chunked: every PATCH and the closing PUT carry an upload _state query
        push_image(client, ref, image)
    with RegistryClient(address, username=user, password=password, docker_config=empty) as client:
        pulled = pull_to_store(client, ref, CacheStore(tmp_path / "store"))
    assert pulled.extracted


def assert_clean(logs: str, password: str, secrets: list[str]) -> None:
    assert '"registry request"' in logs  # our own lines were there
    assert "HTTP Request:" in logs  # and httpx's, so the libraries did log at debug
    assert "receive_response_headers" in logs  # httpcore's response headers too
    for secret in [password, *secrets]:
        assert secret not in logs
    # A challenge's scheme may show ("Basic <redacted>"); a credential's value never.
    assert AUTH_VALUE.findall(logs) == []
    assert "_state" not in logs
    assert [line for line in logs.splitlines() if QUERY.search(line)] == []


def test_a_basic_auth_push_and_pull_logs_no_credential_or_query(
    test_servers: dict[str, str], debug_logs: io.StringIO, tmp_path: Path
) -> None:
    address, user, password = require(
        test_servers,
        "GPUFLEET_TEST_REGISTRY_AUTH",
        "GPUFLEET_TEST_REGISTRY_AUTH_USER",
        "GPUFLEET_TEST_REGISTRY_AUTH_PASSWORD",
    )
    push_and_pull(address, user, password, tmp_path, f"kcache-logs/{tmp_path.name[-12:]}")
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert_clean(debug_logs.getvalue(), password, [basic])


async def test_a_bearer_token_push_and_pull_logs_no_credential_token_or_query(
    token_registry: TokenRegistry, debug_logs: io.StringIO, tmp_path: Path
) -> None:
    await asyncio.to_thread(
        push_and_pull, token_registry.address, "alice", "wonderland", tmp_path, "kcache/logs"
    )
    basic = base64.b64encode(b"alice:wonderland").decode()
    assert_clean(debug_logs.getvalue(), "wonderland", [basic])
