"""The OCI registry client against real registries: Debian's docker-registry.

Two run for the whole session (scripts/servers/registry.sh): an anonymous one
and one behind htpasswd. The bearer-token tests start a third docker-registry
of their own, configured for token auth, with a small aiohttp token service
that signs ES256 JWTs the registry verifies against its certificate.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gpufleet.kcache.credentials import Credentials, docker_credentials
from gpufleet.kcache.errors import (
    AuthError,
    DigestMismatchError,
    KcacheError,
    NotFoundError,
    RegistryError,
)
from gpufleet.kcache.oci import (
    OCI_MANIFEST,
    Descriptor,
    RegistryClient,
    check_plain_http,
    loggable_url,
    sha256_digest,
)
from gpufleet.kcache.reference import Reference
from tests.conftest import require
from tests.doubles.certificates import self_signed

pytestmark = pytest.mark.integration

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


# -- the session's registries --------------------------------------------------------------


@pytest.fixture
def registry(test_servers: dict[str, str]) -> str:
    """host:port of the anonymous registry."""
    (address,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    return address


@pytest.fixture
def registry_data(test_servers: dict[str, str]) -> Path:
    """The anonymous registry's storage root."""
    (data,) = require(test_servers, "GPUFLEET_TEST_REGISTRY_DATA")
    return Path(data)


@pytest.fixture
def auth_registry(test_servers: dict[str, str]) -> tuple[str, str, str]:
    """host:port, user and password of the htpasswd registry."""
    address, user, password = require(
        test_servers,
        "GPUFLEET_TEST_REGISTRY_AUTH",
        "GPUFLEET_TEST_REGISTRY_AUTH_USER",
        "GPUFLEET_TEST_REGISTRY_AUTH_PASSWORD",
    )
    return address, user, password


@pytest.fixture
def no_docker_config(tmp_path: Path) -> Path:
    """A docker config directory with nothing in it, so the host's own never leaks in."""
    empty = tmp_path / "docker-empty"
    empty.mkdir()
    return empty


@pytest.fixture
def repo() -> str:
    """A repository no other test uses."""
    return f"kcache-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(registry: str, no_docker_config: Path) -> Iterator[RegistryClient]:
    with RegistryClient(registry, docker_config=no_docker_config) as c:
        yield c


class RecordingTransport(httpx.HTTPTransport):
    """The real transport, keeping every URL sent, queries included (`requests` drops them)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[httpx.URL] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(request.url)
        return super().handle_request(request)


def methods(client: RegistryClient) -> list[str]:
    return [method for method, _ in client.requests]


def blob_file(data_root: Path, digest: str) -> Path:
    """Where docker-registry's filesystem driver keeps blob ``digest``."""
    hex_digest = digest.removeprefix("sha256:")
    return data_root / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"


def image_manifest(config: bytes, layer: bytes, note: str = "") -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG_TYPE, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": sha256_digest(layer), "size": len(layer)}],
        "annotations": {"io.gpufleet.test/note": note or uuid.uuid4().hex},
    }
    return json.dumps(document, sort_keys=True).encode()


def push_image(
    client: RegistryClient, repository: str, tag: str, note: str = ""
) -> tuple[bytes, str]:
    config, layer = b'{"config": {}}', os.urandom(2048)
    client.push_blob(repository, config)
    client.push_blob(repository, layer)
    manifest = image_manifest(config, layer, note)
    return manifest, client.push_manifest(repository, tag, manifest, OCI_MANIFEST)


# -- blobs ---------------------------------------------------------------------------------


def test_a_small_blob_is_uploaded_in_one_put_and_pulls_back_byte_for_byte(
    client: RegistryClient, repo: str
) -> None:
    data = os.urandom(10_000)
    descriptor = client.push_blob(repo, data)
    sink = io.BytesIO()
    written = client.pull_blob(repo, descriptor.digest, sink)
    assert (descriptor.digest, descriptor.size, written, sink.getvalue()) == (
        sha256_digest(data), len(data), len(data), data
    )  # fmt: skip
    assert methods(client) == ["HEAD", "POST", "PUT", "GET"]


def test_a_file_under_the_chunk_size_is_streamed_in_one_put(
    client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(os.urandom(100 * 1024))
    descriptor = client.push_blob(repo, path, media_type=CONFIG_TYPE)
    assert descriptor == Descriptor(CONFIG_TYPE, sha256_digest(path.read_bytes()), 100 * 1024)
    assert methods(client) == ["HEAD", "POST", "PUT"]
    assert b"".join(client.iter_blob(repo, descriptor.digest)) == path.read_bytes()


def test_a_file_larger_than_the_chunk_size_is_uploaded_as_a_patch_sequence(
    registry: str, no_docker_config: Path, repo: str, tmp_path: Path
) -> None:
    path = tmp_path / "layer.bin"
    path.write_bytes(os.urandom(200 * 1024))
    with RegistryClient(registry, docker_config=no_docker_config, chunk_size=64 * 1024) as client:
        descriptor = client.push_blob(repo, path)
        pulled = b"".join(client.iter_blob(repo, descriptor.digest))
        sent = methods(client)
    assert sent.count("PATCH") == 4  # 64 + 64 + 64 + 8 KiB
    assert sent[-2] == "PUT"  # the closing PUT carries the digest, no data
    assert pulled == path.read_bytes()


def test_progress_is_told_each_chunk_of_a_patch_sequence_and_then_the_whole(
    registry: str, no_docker_config: Path, repo: str, tmp_path: Path
) -> None:
    path = tmp_path / "layer.bin"
    path.write_bytes(os.urandom(200 * 1024))
    told: list[int] = []
    with RegistryClient(registry, docker_config=no_docker_config, chunk_size=64 * 1024) as client:
        client.push_blob(repo, path, progress=told.append)
        client.push_blob(repo, path, progress=told.append)  # there already: done at once
    kib = 1024
    assert told == [64 * kib, 128 * kib, 192 * kib, 200 * kib, 200 * kib, 200 * kib]


def test_progress_of_a_streamed_upload_grows_to_the_file_size(
    client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    path = tmp_path / "layer.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    told: list[int] = []
    client.push_blob(repo, path, progress=told.append)
    assert told == sorted(told)
    assert len(told) > 2
    assert told[-1] == path.stat().st_size


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        (
            "http://r:5000/v2/a/blobs/uploads/u-1?_state=c2VjcmV0&digest=sha256:ab",
            "http://r:5000/v2/a/blobs/uploads/u-1",
        ),
        (
            "https://user:pw@s3.example/bucket/blob?X-Amz-Signature=f00&X-Amz-Credential=k#x",
            "https://s3.example/bucket/blob",
        ),
        ("https://r/v2/", "https://r/v2/"),
    ],
)
def test_a_logged_url_keeps_no_query_fragment_or_user_info(url: str, logged: str) -> None:
    assert loggable_url(url) == logged


def test_chunked_forces_patches_even_for_a_blob_under_the_chunk_size(
    client: RegistryClient, repo: str
) -> None:
    client.push_blob(repo, b"tiny but chunked", chunked=True)
    assert methods(client) == ["HEAD", "POST", "PATCH", "PUT"]


def test_a_blob_the_repository_has_is_checked_with_head_and_never_uploaded_again(
    registry: str, no_docker_config: Path, repo: str
) -> None:
    data = os.urandom(4096)
    with RegistryClient(registry, docker_config=no_docker_config) as first:
        first.push_blob(repo, data)
    with RegistryClient(registry, docker_config=no_docker_config) as second:
        second.push_blob(repo, data)
        assert methods(second) == ["HEAD"]


def test_a_blob_is_mounted_from_another_repository_instead_of_uploaded(
    client: RegistryClient, registry: str, no_docker_config: Path, repo: str
) -> None:
    data = os.urandom(4096)
    digest = client.push_blob(repo, data).digest
    target = f"{repo}-mounted"
    transport = RecordingTransport()
    with RegistryClient(registry, docker_config=no_docker_config, transport=transport) as mounting:
        mounting.push_blob(target, data, mount_from=repo)
        assert mounting.blob_exists(target, digest)
        sent = mounting.requests
    posts = [url for url in transport.urls if url.path.endswith("/blobs/uploads/")]
    assert len(posts) == 1
    assert posts[0].params["mount"] == digest
    assert posts[0].params["from"] == repo
    assert not {"PATCH", "PUT"} & {method for method, _ in sent}


def test_a_mount_the_registry_cannot_do_falls_back_to_an_upload(
    registry: str, no_docker_config: Path, repo: str
) -> None:
    data = os.urandom(4096)
    transport = RecordingTransport()
    with RegistryClient(registry, docker_config=no_docker_config, transport=transport) as client:
        client.push_blob(repo, data, mount_from=f"{repo}-never-had-it")
        assert methods(client) == ["HEAD", "POST", "PUT"]
        assert "mount" in transport.urls[1].params
        assert b"".join(client.iter_blob(repo, sha256_digest(data))) == data


def test_a_caller_digest_that_does_not_match_the_bytes_is_refused_before_any_request(
    client: RegistryClient, repo: str
) -> None:
    with pytest.raises(DigestMismatchError, match="hashes to"):
        client.push_blob(repo, b"content", digest=sha256_digest(b"other content"))
    assert client.requests == []


def test_a_file_uploaded_under_a_wrong_digest_is_refused_by_the_registry(
    client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"the real content")
    with pytest.raises(RegistryError, match="DIGEST_INVALID"):
        client.push_blob(repo, path, digest=sha256_digest(b"a different content"))


def test_pulling_a_blob_the_repository_lacks_is_not_found(
    client: RegistryClient, repo: str
) -> None:
    missing = sha256_digest(b"never pushed " + os.urandom(8))
    assert not client.blob_exists(repo, missing)
    with pytest.raises(NotFoundError, match=missing):
        client.pull_blob(repo, missing, io.BytesIO())


def test_a_blob_flipped_in_registry_storage_fails_its_digest_check_naming_it(
    client: RegistryClient, repo: str, registry_data: Path
) -> None:
    data = os.urandom(300 * 1024)  # random, so no other test shares the blob
    digest = client.push_blob(repo, data).digest
    stored = blob_file(registry_data, digest)
    tampered = bytearray(stored.read_bytes())
    tampered[150_000] ^= 0x01
    stored.write_bytes(bytes(tampered))
    with pytest.raises(DigestMismatchError, match=digest) as caught:
        client.pull_blob(repo, digest, io.BytesIO())
    assert repo in str(caught.value)


def test_iter_blob_yields_every_chunk_before_it_raises_on_tampered_content(
    client: RegistryClient, repo: str, registry_data: Path
) -> None:
    data = os.urandom(64 * 1024)
    digest = client.push_blob(repo, data).digest
    blob_file(registry_data, digest).write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    received = bytearray()

    def consume() -> None:
        for chunk in client.iter_blob(repo, digest):
            received.extend(chunk)

    with pytest.raises(DigestMismatchError):
        consume()
    assert len(received) == len(data)


# -- manifests -----------------------------------------------------------------------------


def test_a_manifest_pushed_by_tag_comes_back_by_tag_and_by_digest_and_resolves(
    client: RegistryClient, repo: str
) -> None:
    manifest, digest = push_image(client, repo, "v1")
    assert digest == sha256_digest(manifest)
    assert client.get_manifest(repo, "v1") == (manifest, OCI_MANIFEST, digest)
    assert client.get_manifest(repo, digest) == (manifest, OCI_MANIFEST, digest)
    assert client.resolve(repo, "v1") == digest


def test_resolving_a_tag_that_does_not_exist_is_none(client: RegistryClient, repo: str) -> None:
    push_image(client, repo, "v1")
    assert client.resolve(repo, "v2") is None


def test_a_manifest_digest_the_registry_lacks_is_not_found(
    client: RegistryClient, repo: str
) -> None:
    push_image(client, repo, "v1")
    with pytest.raises(NotFoundError):
        client.get_manifest(repo, sha256_digest(b"no such manifest"))


@pytest.mark.parametrize("by", ["digest", "tag"])
def test_a_manifest_altered_in_registry_storage_is_refused(
    client: RegistryClient, repo: str, registry_data: Path, by: str
) -> None:
    note = f"original-{uuid.uuid4().hex}"
    _, digest = push_image(client, repo, "v1", note)
    stored = blob_file(registry_data, digest)
    # Still a valid manifest, so the registry serves it; only the hash can tell.
    stored.write_bytes(stored.read_bytes().replace(note.encode(), note.upper().encode()))
    with pytest.raises(DigestMismatchError, match=digest):
        client.get_manifest(repo, digest if by == "digest" else "v1")


def test_a_deleted_manifest_no_longer_resolves(client: RegistryClient, repo: str) -> None:
    _, digest = push_image(client, repo, "v1")
    client.delete_manifest(repo, digest)
    assert client.resolve(repo, "v1") is None


# -- anonymous and htpasswd (basic) auth ---------------------------------------------------


def test_the_anonymous_registry_needs_no_credentials(client: RegistryClient, repo: str) -> None:
    _, digest = push_image(client, repo, "v1")
    assert client.resolve(repo, "v1") == digest
    assert not [path for _, path in client.requests if "token" in path]


def test_the_htpasswd_registry_works_with_the_right_credentials(
    auth_registry: tuple[str, str, str], no_docker_config: Path, repo: str
) -> None:
    address, user, password = auth_registry
    data = os.urandom(1024)
    with RegistryClient(
        address, username=user, password=password, docker_config=no_docker_config
    ) as client:
        digest = client.push_blob(repo, data).digest
        assert b"".join(client.iter_blob(repo, digest)) == data
        # One challenge, then Basic is sent up front: HEAD, HEAD again, POST, PUT, GET.
        assert methods(client) == ["HEAD", "HEAD", "POST", "PUT", "GET"]


def test_the_htpasswd_registry_refuses_a_wrong_password_naming_registry_and_user(
    auth_registry: tuple[str, str, str], no_docker_config: Path, repo: str
) -> None:
    address, user, _ = auth_registry
    with (
        RegistryClient(
            address, username=user, password="not-it", docker_config=no_docker_config
        ) as client,
        pytest.raises(AuthError, match=f"{address} refused user '{user}'"),
    ):
        client.push_blob(repo, b"data")


def test_the_htpasswd_registry_without_credentials_says_they_are_missing(
    auth_registry: tuple[str, str, str], no_docker_config: Path, repo: str
) -> None:
    address, _, _ = auth_registry
    with (
        RegistryClient(address, docker_config=no_docker_config) as client,
        pytest.raises(AuthError, match=f"{address} requires credentials"),
    ):
        client.resolve(repo, "v1")


def write_docker_config(directory: Path, document: object) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(document))
    return directory


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(lambda host, u, p: {host: {"auth": basic(u, p)}}, id="auth-base64"),
        pytest.param(
            lambda host, u, p: {host: {"username": u, "password": p}}, id="username-password"
        ),
        pytest.param(
            lambda host, u, p: {f"http://{host}/v2/": {"auth": basic(u, p)}}, id="url-key"
        ),
    ],
)
def test_docker_config_json_credentials_open_the_htpasswd_registry(
    auth_registry: tuple[str, str, str],
    tmp_path: Path,
    repo: str,
    entry: Callable[[str, str, str], dict[str, object]],
) -> None:
    address, user, password = auth_registry
    config = write_docker_config(tmp_path / "docker", {"auths": entry(address, user, password)})
    with RegistryClient(address, docker_config=config) as client:
        _, digest = push_image(client, repo, "v1")
        assert client.resolve(repo, "v1") == digest


def test_docker_config_is_found_through_the_docker_config_variable(
    auth_registry: tuple[str, str, str], tmp_path: Path, repo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, user, password = auth_registry
    config = write_docker_config(
        tmp_path / "env-docker", {"auths": {address: {"auth": basic(user, password)}}}
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    with RegistryClient(address) as client:
        assert client.resolve(repo, "absent") is None


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ({"credsStore": "desktop", "auths": {"ADDRESS": {}}}, "credsStore"),
        ({"credHelpers": {"ADDRESS": "ecr-login"}}, "credHelpers"),
    ],
)
def test_a_credential_helper_in_docker_config_is_a_clear_error(
    auth_registry: tuple[str, str, str],
    tmp_path: Path,
    repo: str,
    document: dict[str, object],
    named: str,
) -> None:
    address, _, _ = auth_registry
    text = json.dumps(document).replace("ADDRESS", address)
    config = write_docker_config(tmp_path / "docker", json.loads(text))
    with (
        RegistryClient(address, docker_config=config) as client,
        pytest.raises(AuthError, match=f"{named}.*helpers are not supported"),
    ):
        client.resolve(repo, "v1")


def test_docker_hub_credentials_are_found_under_the_v1_index_key(tmp_path: Path) -> None:
    config = write_docker_config(
        tmp_path / "docker", {"auths": {"https://index.docker.io/v1/": {"auth": basic("u", "p")}}}
    )
    found = docker_credentials(Reference.parse("ubuntu").registry, config)
    assert isinstance(found, Credentials)
    assert (found.username, found.password) == ("u", "p")


def test_a_credential_helper_does_not_stop_anonymous_access(
    registry: str, tmp_path: Path, repo: str
) -> None:
    config = write_docker_config(tmp_path / "docker", {"credsStore": "desktop"})
    with RegistryClient(registry, docker_config=config) as client:
        assert client.resolve(repo, "v1") is None


# -- bearer tokens: a docker-registry with token auth and a token service ------------------


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
        """A self-signed certificate over the signing key, sent as the tokens' ``x5c``."""
        return self_signed("gpufleet test token service", key=self.key).certificate

    def token(self, scopes: list[str], user: str | None) -> str:
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


@pytest.fixture
async def token_registry(
    test_servers: dict[str, str], tmp_path: Path
) -> AsyncIterator[TokenRegistry]:
    """A real docker-registry demanding Bearer tokens from a TokenService on loopback."""
    (binary,) = require(test_servers, "GPUFLEET_TEST_REGISTRY_BIN")
    service = TokenService(users={"alice": "wonderland"})
    app = web.Application()
    app.router.add_get("/token", service.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    token_socket = socket.socket()
    token_socket.bind(("127.0.0.1", 0))
    await web.SockSite(runner, token_socket).start()
    token_port = token_socket.getsockname()[1]
    (tmp_path / "root.pem").write_bytes(service.pem())
    port = _free_port()
    (tmp_path / "config.yml").write_text(
        f"""version: 0.1
log: {{level: info}}
storage:
  filesystem: {{rootdirectory: {tmp_path}/data}}
  delete: {{enabled: true}}
  redirect: {{disable: true}}
http: {{addr: 127.0.0.1:{port}}}
auth:
  token:
    realm: http://127.0.0.1:{token_port}/token
    service: gpufleet-test-registry
    issuer: gpufleet-test-issuer
    rootcertbundle: {tmp_path}/root.pem
"""
    )
    log_path = tmp_path / "registry.log"
    with log_path.open("wb") as log:
        # A clean environment: docker-registry reads REGISTRY_* variables as config overrides.
        process = await asyncio.create_subprocess_exec(
            binary, "serve", str(tmp_path / "config.yml"),
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


async def test_bearer_tokens_for_the_right_scope_authorise_push_and_pull(
    token_registry: TokenRegistry, no_docker_config: Path, repo: str
) -> None:
    def scenario() -> tuple[bytes, bytes]:
        with RegistryClient(
            token_registry.address, username="alice", password="wonderland",
            docker_config=no_docker_config,
        ) as client:  # fmt: skip
            pushed, digest = push_image(client, repo, "v1")
            return pushed, client.get_manifest(repo, digest)[0]

    pushed, pulled = await asyncio.to_thread(scenario)
    assert pulled == pushed
    # One token per scope, cached: not one per request.
    assert token_registry.service.seen == [
        ([f"repository:{repo}:pull,push"], "alice"),
        ([f"repository:{repo}:pull"], "alice"),
    ]


async def test_the_token_service_answering_access_token_works_too(
    token_registry: TokenRegistry, no_docker_config: Path, repo: str
) -> None:
    token_registry.service.token_field = "access_token"

    def scenario() -> str | None:
        with RegistryClient(
            token_registry.address, username="alice", password="wonderland",
            docker_config=no_docker_config,
        ) as client:  # fmt: skip
            push_image(client, repo, "v1")
            return client.resolve(repo, "v1")

    assert await asyncio.to_thread(scenario) is not None


async def test_an_anonymous_bearer_token_pulls_but_cannot_push(
    token_registry: TokenRegistry, no_docker_config: Path, repo: str
) -> None:
    def push_as_alice() -> str:
        with RegistryClient(
            token_registry.address, username="alice", password="wonderland",
            docker_config=no_docker_config,
        ) as alice:  # fmt: skip
            return push_image(alice, repo, "v1")[1]

    digest = await asyncio.to_thread(push_as_alice)
    with RegistryClient(token_registry.address, docker_config=no_docker_config) as anyone:
        assert await asyncio.to_thread(anyone.resolve, repo, "v1") == digest
        with pytest.raises(AuthError, match=f"{token_registry.address} requires credentials"):
            await asyncio.to_thread(anyone.push_blob, repo, b"anonymous push")
    assert ([f"repository:{repo}:pull"], None) in token_registry.service.seen


async def test_credentials_the_token_service_refuses_are_an_auth_error(
    token_registry: TokenRegistry, no_docker_config: Path, repo: str
) -> None:
    def scenario() -> None:
        with RegistryClient(
            token_registry.address, username="alice", password="looking-glass",
            docker_config=no_docker_config,
        ) as client:  # fmt: skip
            client.resolve(repo, "v1")

    with pytest.raises(AuthError, match="refused user 'alice'"):
        await asyncio.to_thread(scenario)


# -- transport rules, through httpx's MockTransport ----------------------------------------


def test_blob_gets_follow_a_redirect_to_storage(no_docker_config: Path) -> None:
    data = b"served by storage"
    digest = sha256_digest(data)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage.example.com":
            return httpx.Response(200, content=data)
        return httpx.Response(307, headers={"Location": "https://storage.example.com/b?sig=x"})

    with RegistryClient(
        "registry.example.com",
        docker_config=no_docker_config,
        transport=httpx.MockTransport(handler),
    ) as client:
        assert b"".join(client.iter_blob("a/b", digest)) == data
        # The record keeps no query: a presigned one carries the storage signature.
        assert client.requests == [("GET", f"/v2/a/b/blobs/{digest}"), ("GET", "/b")]


@pytest.mark.parametrize(
    ("address", "plain_http", "scheme"),
    [
        ("127.0.0.1:5000", None, "http"),
        ("localhost:5000", None, "http"),
        ("[::1]:5000", None, "http"),
        ("registry.example.com", None, "https"),
        ("10.0.0.5:5000", None, "https"),
        ("registry.example.com", True, "http"),
        ("127.0.0.1:5000", False, "https"),
    ],
)
def test_plain_http_is_automatic_only_for_loopback(
    no_docker_config: Path, address: str, plain_http: bool | None, scheme: str
) -> None:
    schemes: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        schemes.append(request.url.scheme)
        return httpx.Response(404)

    with RegistryClient(
        address, plain_http=plain_http, docker_config=no_docker_config,
        transport=httpx.MockTransport(handler),
    ) as client:  # fmt: skip
        assert client.resolve("a/b", "v1") is None
    assert schemes == [scheme]


@pytest.mark.parametrize("address", ["127.0.0.1:5000", "127.3.2.1", "localhost:5000", "[::1]:80"])
def test_check_plain_http_allows_loopback(address: str) -> None:
    check_plain_http(address, forced=False)


def test_check_plain_http_refuses_a_remote_registry_unless_forced() -> None:
    with pytest.raises(KcacheError, match=r"registry\.example\.com.*--force-plain-http"):
        check_plain_http("registry.example.com:5000", forced=False)
    check_plain_http("registry.example.com:5000", forced=True)


def test_credentials_are_never_sent_to_a_plain_http_token_service(
    no_docker_config: Path,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        challenge = 'Bearer realm="http://auth.example.com/token",service="registry"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    with (
        RegistryClient(
            "registry.example.com", username="u", password="p",
            docker_config=no_docker_config, transport=httpx.MockTransport(handler),
        ) as client,
        pytest.raises(AuthError, match="refusing to send credentials"),
    ):  # fmt: skip
        client.resolve("a/b", "v1")
    assert [path for _, path in client.requests] == ["/v2/a/b/manifests/v1"]


def test_registry_errors_carry_the_registrys_error_code(no_docker_config: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"errors": [{"code": "DENIED", "message": "quota exceeded"}]}
        return httpx.Response(500, json=body)

    with (
        RegistryClient(
            "127.0.0.1:5000", docker_config=no_docker_config, transport=httpx.MockTransport(handler)
        ) as client,
        pytest.raises(RegistryError, match="DENIED: quota exceeded"),
    ):
        client.get_manifest("a/b", "v1")


# -- references ----------------------------------------------------------------------------

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5000/a/b:tag", Reference("127.0.0.1:5000", "a/b", "tag")),
        ("localhost/cache@" + DIGEST, Reference("localhost", "cache", None, DIGEST)),
        ("localhost:5000/c:v1@" + DIGEST, Reference("localhost:5000", "c", "v1", DIGEST)),
        ("ghcr.io/org/team/kernels:v1.2", Reference("ghcr.io", "org/team/kernels", "v1.2")),
        ("[::1]:5000/a:b", Reference("[::1]:5000", "a", "b")),
        ("ubuntu", Reference("registry-1.docker.io", "library/ubuntu")),
        ("docker.io/ubuntu:22.04", Reference("registry-1.docker.io", "library/ubuntu", "22.04")),
        ("index.docker.io/org/img", Reference("registry-1.docker.io", "org/img")),
        ("org/img:tag", Reference("registry-1.docker.io", "org/img", "tag")),
        ("host.example/a_b/c-d/e__f/g.h", Reference("host.example", "a_b/c-d/e__f/g.h")),
    ],
)
def test_reference_parse(text: str, expected: Reference) -> None:
    assert Reference.parse(text) == expected
    assert Reference.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " host/a",
        "Host.example/UPPER",
        "host:5000/a:bad tag",
        "host:5000/a:",
        "host/a@sha256:123",
        "host/a@md5:" + "ab" * 16,
        "host/",
        "host//a",
        "host/a/",
        "-a/b",
        "host:port:5000/a",
    ],
)
def test_reference_parse_refuses_nonsense_naming_it(text: str) -> None:
    with pytest.raises(KcacheError, match=re.escape(f"invalid image reference {text!r}")):
        Reference.parse(text)


def test_reference_with_digest_and_with_tag() -> None:
    reference = Reference.parse("localhost:5000/cache:v1")
    assert str(reference.with_digest(DIGEST)) == f"localhost:5000/cache:v1@{DIGEST}"
    assert str(reference.with_digest(DIGEST).with_tag("v2")) == "localhost:5000/cache:v2"
    with pytest.raises(KcacheError):
        reference.with_digest("sha256:short")
