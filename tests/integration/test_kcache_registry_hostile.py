"""The registry client against hostile registries: small HTTP servers on real loopback sockets.

Each server here speaks just enough of the distribution API to lead the client
somewhere it must not go: an upload ``Location`` on another origin or over
plain HTTP, a storage host that answers a redirected blob GET with its own
auth challenge, a token realm off this machine, error bodies of gigabytes, a
manifest redirect, a registry that trickles bytes. What reached each server is
recorded there, so the tests assert on what a peer really received.
"""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from gpufleet.kcache.errors import AuthError, KcacheError, RegistryError
from gpufleet.kcache.oci import RegistryClient, sha256_digest
from tests.doubles.certificates import self_signed
from tests.doubles.hostile import (
    HANG_GUARD_S,
    HUGE,
    SOCKET_SLACK,
    Handler,
    HostileServer,
    Reply,
    Seen,
    in_thread,
)

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice", "s3cret-wonderland"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
TOKEN = "tok-0123456789abcdef"
MAX_ERROR_BODY = 64 * 1024  # the cap on error, 401 and token bodies


@pytest.fixture
def no_docker_config(tmp_path: Path) -> Path:
    empty = tmp_path / "docker-empty"
    empty.mkdir()
    return empty


def client_for(server: HostileServer, config: Path, **kwargs: object) -> RegistryClient:
    return RegistryClient(
        server.address, username=USER, password=PASSWORD, docker_config=config, **kwargs
    )  # type: ignore[arg-type]


def authorized(seen: Iterable[Seen]) -> list[str]:
    return [s.headers["authorization"] for s in seen if "authorization" in s.headers]


# -- hostile registries ---------------------------------------------------------------------


def basic_registry(location: Callable[[Seen], str], done: Reply | None = None) -> Handler:
    """A registry behind Basic auth whose upload sessions live at `location`."""

    def handle(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != BASIC:
            return Reply(401, {"WWW-Authenticate": 'Basic realm="hostile"'})
        if seen.method == "HEAD":
            return Reply(404)
        if seen.method in ("POST", "PATCH"):
            return Reply(202, {"Location": location(seen)})
        return done or Reply(201)

    return handle


def bearer_registry(realm: Callable[[], str], location: Callable[[Seen], str]) -> Handler:
    """A registry behind bearer tokens, whose token service is `realm`."""

    def handle(seen: Seen) -> Reply:
        if seen.target.startswith("/token"):
            return Reply(
                200, {"Content-Type": "application/json"}, b'{"token": "%s"}' % TOKEN.encode()
            )
        if seen.headers.get("authorization") != f"Bearer {TOKEN}":
            challenge = f'Bearer realm="{realm()}",service="hostile"'
            return Reply(401, {"WWW-Authenticate": challenge})
        if seen.method == "HEAD":
            return Reply(404)
        if seen.method in ("POST", "PATCH"):
            return Reply(202, {"Location": location(seen)})
        return Reply(201)

    return handle


def collector() -> Handler:
    """Another origin, glad to take whatever is sent to it."""

    def handle(seen: Seen) -> Reply:
        if seen.method in ("POST", "PATCH"):
            return Reply(202, {"Location": "/steal/next?_state=collected"})
        return Reply(201)

    return handle


# -- item 1: credentials go to the registry's own origin only ------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["put", "patch"])
def test_an_upload_location_on_another_origin_gets_no_basic_credentials(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path, chunked: bool
) -> None:
    steal = hostile_servers(collector())
    registry = hostile_servers(basic_registry(lambda _: steal.url("/steal?_state=abc")))
    with client_for(registry, no_docker_config) as client:
        in_thread(lambda: client.push_blob("a/b", b"layer bytes", chunked=chunked))
    assert steal.seen, "the upload never reached the Location the registry named"
    assert authorized(steal.seen) == []
    assert BASIC in authorized(registry.seen)


@pytest.mark.parametrize("chunked", [False, True], ids=["put", "patch"])
def test_an_upload_location_on_another_origin_gets_no_bearer_token(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path, chunked: bool
) -> None:
    steal = hostile_servers(collector())
    registry: HostileServer = hostile_servers(
        bearer_registry(lambda: registry.url("/token"), lambda _: steal.url("/steal?_state=abc"))
    )
    with client_for(registry, no_docker_config) as client:
        in_thread(lambda: client.push_blob("a/b", b"layer bytes", chunked=chunked))
    assert steal.seen
    assert authorized(steal.seen) == []
    assert f"Bearer {TOKEN}" in authorized(registry.seen)


def test_a_location_on_the_same_host_but_another_port_is_another_origin(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    steal = hostile_servers(collector())
    # A relative-looking path is joined to the registry; a full URL names its own origin.
    registry = hostile_servers(basic_registry(lambda _: f"//{steal.address}/steal?_state=abc"))
    with client_for(registry, no_docker_config) as client:
        in_thread(lambda: client.push_blob("a/b", b"layer bytes"))
    assert steal.seen
    assert authorized(steal.seen) == []


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    certificate = self_signed("127.0.0.1", hosts=["127.0.0.1"])
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    return certificate.server_context(cert_path, key_path), cert_path


@pytest.mark.parametrize("other_host", [False, True], ids=["same-host", "other-host"])
def test_an_https_registry_sending_the_upload_to_plain_http_is_refused(
    hostile_servers: Callable[..., HostileServer],
    no_docker_config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    other_host: bool,
) -> None:
    tls, cert = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx trusts our test CA through it
    steal = hostile_servers(collector())
    registry: HostileServer = hostile_servers(
        basic_registry(
            lambda _: (steal if other_host else registry).url("/steal?_state=abc", scheme="http")
        ),
        tls,
    )
    with client_for(registry, no_docker_config, plain_http=False) as client:
        error = in_thread(lambda: client.push_blob("a/b", b"layer bytes"))
    assert isinstance(error, RegistryError)
    assert "plain HTTP" in str(error)
    assert steal.seen == []
    assert [s.method for s in registry.seen] == ["HEAD", "HEAD", "POST"]


# -- item 2: a challenge is answered only when the registry itself sent it ------------------


def test_a_storage_host_challenge_after_a_blob_redirect_gets_no_credentials(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    realm = hostile_servers(lambda seen: Reply(200, {}, b'{"token": "stolen"}'))

    def storage_handler(seen: Seen) -> Reply:
        challenge = f'Bearer realm="{realm.url("/token")}",service="storage"'
        return Reply(401, {"WWW-Authenticate": challenge})

    storage = hostile_servers(storage_handler)
    digest = sha256_digest(b"blob")

    def registry_handler(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != BASIC:
            return Reply(401, {"WWW-Authenticate": 'Basic realm="hostile"'})
        return Reply(307, {"Location": storage.url("/blob?X-Amz-Signature=sig")})

    registry = hostile_servers(registry_handler)
    with client_for(registry, no_docker_config) as client:
        error = in_thread(lambda: b"".join(client.iter_blob("a/b", digest)))
    assert isinstance(error, RegistryError)
    assert not isinstance(error, AuthError)
    assert "401" in str(error)
    assert realm.seen == []
    assert authorized(storage.seen) == []


# -- item 8: a plain-HTTP token realm is trusted with a password only on loopback -----------


def test_a_plain_http_registry_cannot_send_the_password_to_a_plain_http_realm_off_loopback(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    registry = hostile_servers(
        lambda seen: Reply(
            401, {"WWW-Authenticate": 'Bearer realm="http://collector.invalid/token",service="x"'}
        )
    )
    with client_for(registry, no_docker_config, plain_http=True) as client:
        error = in_thread(lambda: client.resolve("a/b", "v1"))
    assert isinstance(error, AuthError)
    assert "refusing to send credentials" in str(error)
    # No token request was even tried: the realm's host is never contacted.
    assert [s.method for s in registry.seen] == ["HEAD"]


def test_a_plain_http_realm_on_loopback_still_gets_the_credentials(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    digest = sha256_digest(b"{}")
    registry: HostileServer = hostile_servers(
        bearer_registry(lambda: registry.url("/token"), lambda _: "/unused")
    )
    with client_for(registry, no_docker_config) as client:
        in_thread(lambda: client.resolve("a/b", digest))
    token_requests = [s for s in registry.seen if s.target.startswith("/token")]
    assert [s.headers.get("authorization") for s in token_requests] == [BASIC]


# -- item 8: manifests follow no redirect; no redirect goes from https to http --------------


def test_a_manifest_get_follows_no_redirect(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    elsewhere = hostile_servers(
        lambda seen: Reply(200, {"Content-Type": "application/json"}, b"{}")
    )
    registry = hostile_servers(lambda seen: Reply(307, {"Location": elsewhere.url("/manifest")}))
    with RegistryClient(registry.address, docker_config=no_docker_config) as client:
        error = in_thread(lambda: client.get_manifest("a/b", "v1"))
    assert isinstance(error, RegistryError)
    assert "307" in str(error)
    assert elsewhere.seen == []


def test_an_https_blob_redirect_to_plain_http_is_refused(
    hostile_servers: Callable[..., HostileServer],
    no_docker_config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls, cert = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    storage = hostile_servers(lambda seen: Reply(200, {}, b"blob"))
    registry = hostile_servers(
        lambda seen: Reply(307, {"Location": storage.url("/blob?X-Amz-Signature=s")}), tls
    )
    with RegistryClient(registry.address, plain_http=False, docker_config=no_docker_config) as c:
        error = in_thread(lambda: b"".join(c.iter_blob("a/b", sha256_digest(b"blob"))))
    assert isinstance(error, RegistryError)
    assert "plain HTTP" in str(error)
    assert storage.seen == []


def test_blob_redirects_are_followed_a_bounded_number_of_times(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    loop: HostileServer = hostile_servers(lambda seen: Reply(307, {"Location": loop.url("/again")}))
    with RegistryClient(loop.address, docker_config=no_docker_config) as client:
        error = in_thread(lambda: b"".join(client.iter_blob("a/b", sha256_digest(b"x"))))
    assert isinstance(error, RegistryError)
    assert len(loop.seen) <= 11


# -- item 5: no query string is kept in the request record ---------------------------------


def test_requests_record_no_query_of_uploads_or_presigned_redirects(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    data = b"presigned"
    storage = hostile_servers(lambda seen: Reply(200, {}, data))

    def registry_handler(seen: Seen) -> Reply:
        if seen.method == "HEAD":
            return Reply(404)
        if seen.method == "POST":
            return Reply(202, {"Location": "/v2/a/b/blobs/uploads/u1?_state=SECRETSTATE"})
        if seen.method == "PUT":
            return Reply(201)
        query = "X-Amz-Credential=AKIAEXAMPLE&X-Amz-Security-Token=TOKEN&X-Amz-Signature=SIG"
        return Reply(307, {"Location": storage.url(f"/bucket/blob?{query}")})

    registry = hostile_servers(registry_handler)
    with RegistryClient(registry.address, docker_config=no_docker_config) as client:
        client.push_blob("a/b", data)
        assert b"".join(client.iter_blob("a/b", sha256_digest(data))) == data
        recorded = client.requests
    assert [path for _, path in recorded] == [
        f"/v2/a/b/blobs/{sha256_digest(data)}",
        "/v2/a/b/blobs/uploads/",
        "/v2/a/b/blobs/uploads/u1",
        f"/v2/a/b/blobs/{sha256_digest(data)}",
        "/bucket/blob",
    ]
    # The servers did get the queries: the record, not the requests, drops them.
    assert "_state=SECRETSTATE" in registry.seen[2].target
    assert "X-Amz-Signature=SIG" in storage.seen[0].target


# -- item 6: error, 401 and token bodies are read up to 64 KiB ------------------------------


def endless(total: int = HUGE, chunk: int = 256 * 1024) -> Iterator[bytes]:
    block = b'{"errors": [' + b" " * (chunk - 12)
    for _ in range(total // chunk):
        yield block


def test_an_endless_error_body_is_read_no_further_than_the_cap(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    def handle(seen: Seen) -> Reply:
        if seen.method == "HEAD":
            return Reply(404)
        return Reply(500, {"Content-Type": "application/json"}, endless())

    registry = hostile_servers(handle)
    with RegistryClient(registry.address, docker_config=no_docker_config) as client:
        error = in_thread(lambda: client.push_blob("a/b", b"x"))
    assert isinstance(error, RegistryError)
    assert "HTTP 500" in str(error)
    assert [s.method for s in registry.seen] == ["HEAD", "POST"]
    assert registry.sent < MAX_ERROR_BODY + SOCKET_SLACK


def test_an_endless_error_body_on_a_streamed_get_is_read_no_further_than_the_cap(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    registry = hostile_servers(
        lambda seen: Reply(500, {"Content-Type": "application/json"}, endless())
    )
    with RegistryClient(registry.address, docker_config=no_docker_config) as client:
        error = in_thread(lambda: client.get_manifest("a/b", "v1"))
    assert isinstance(error, RegistryError)
    assert registry.sent < MAX_ERROR_BODY + SOCKET_SLACK


def test_an_endless_401_body_is_read_no_further_than_the_cap(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    registry = hostile_servers(
        lambda seen: Reply(401, {"WWW-Authenticate": 'Basic realm="x"'}, endless())
    )
    with client_for(registry, no_docker_config) as client:
        error = in_thread(lambda: client.get_manifest("a/b", "v1"))
    assert isinstance(error, AuthError)
    assert registry.sent < 2 * (MAX_ERROR_BODY + SOCKET_SLACK)


def test_an_endless_token_body_is_read_no_further_than_the_cap(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    def handle(seen: Seen) -> Reply:
        if seen.target.startswith("/token"):
            return Reply(200, {"Content-Type": "application/json"}, endless())
        return Reply(401, {"WWW-Authenticate": f'Bearer realm="{registry.url("/token")}"'})

    registry: HostileServer = hostile_servers(handle)
    with client_for(registry, no_docker_config) as client:
        error = in_thread(lambda: client.resolve("a/b", "v1"))
    assert isinstance(error, AuthError)
    assert "sent no token" in str(error)
    assert registry.sent < MAX_ERROR_BODY + SOCKET_SLACK


# -- item 8: an overall deadline, whatever the per-read timeout ----------------------------


def trickle(total: int = 4096) -> Iterator[bytes]:
    """One byte at a time, each well inside any per-read timeout."""
    stop = threading.Event()
    for _ in range(total):
        stop.wait(0.02)
        yield b"x"


def test_a_registry_trickling_a_blob_is_cut_off_at_the_deadline(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    registry = hostile_servers(lambda seen: Reply(200, {}, trickle()))
    with RegistryClient(
        registry.address, docker_config=no_docker_config, timeout=30.0, deadline=0.5
    ) as client:
        error = in_thread(lambda: b"".join(client.iter_blob("a/b", sha256_digest(b"x"))))
    assert isinstance(error, RegistryError)
    assert "deadline" in str(error)
    assert registry.sent < 4096


def test_a_registry_trickling_an_error_body_is_cut_off_at_the_deadline(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    registry = hostile_servers(
        lambda seen: Reply(404) if seen.method == "HEAD" else Reply(500, {}, trickle())
    )
    with RegistryClient(
        registry.address, docker_config=no_docker_config, timeout=30.0, deadline=0.5
    ) as client:
        error = in_thread(lambda: client.push_blob("a/b", b"x"))
    assert isinstance(error, RegistryError)
    assert "deadline" in str(error)
    assert registry.sent < 4096


def test_no_request_starts_once_the_deadline_has_passed(
    hostile_servers: Callable[..., HostileServer], no_docker_config: Path
) -> None:
    registry = hostile_servers(lambda seen: Reply(200, {}, trickle(200)))
    with RegistryClient(
        registry.address, docker_config=no_docker_config, timeout=30.0, deadline=0.2
    ) as client:
        first = in_thread(lambda: b"".join(client.iter_blob("a/b", sha256_digest(b"x"))))
        count = len(registry.seen)
        second = in_thread(lambda: client.resolve("a/b", "v1"))
    assert isinstance(first, RegistryError)
    assert isinstance(second, RegistryError)
    assert "deadline" in str(second)
    assert len(registry.seen) == count


def test_a_deadline_that_is_not_positive_is_refused() -> None:
    with pytest.raises(KcacheError, match="deadline"):
        RegistryClient("127.0.0.1:5000", deadline=0)


def _cache_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "KCACHE_"))}
    return subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "cache", *args],
        capture_output=True, text=True, env={**clean, **env}, timeout=HANG_GUARD_S, check=False,
    )  # fmt: skip


def test_cache_extract_gives_up_at_its_deadline_flag_with_one_line(
    hostile_servers: Callable[..., HostileServer], tmp_path: Path
) -> None:
    registry = hostile_servers(lambda seen: Reply(200, {}, trickle()))
    done = _cache_cli(
        "extract", f"{registry.address}/a/b:v1", "--store", str(tmp_path / "store"),
        "--deadline", "0.5", env={},
    )  # fmt: skip
    assert done.returncode == 1
    assert "deadline" in done.stderr
    assert "Traceback" not in done.stderr
    assert registry.sent < 4096


def test_a_kcache_deadline_that_is_not_positive_is_a_usage_error_naming_it(
    tmp_path: Path,
) -> None:
    done = _cache_cli(
        "extract", "127.0.0.1:9/a/b:v1", "--store", str(tmp_path), env={"KCACHE_DEADLINE": "0"}
    )
    assert done.returncode == 2
    assert "KCACHE_DEADLINE" in done.stderr
