"""The registry client: blobs and manifests over the OCI distribution API, verified by digest.

Synchronous, on httpx. `RegistryClient` speaks the parts of the distribution
API that kernel cache images need: HEAD before upload, cross-repository mount,
monolithic and chunked uploads, manifests by tag or digest, referrers. Every
byte read from a registry is hashed while it streams and checked against the
digest that named it; see docs/kcache-oci.md. The HTTP under it (origin,
redirects, deadline, one answered challenge) is `kcache.session`'s, the auth
flow `kcache.auth`'s; image references live in `kcache.reference` and docker
``config.json`` credentials in `kcache.credentials`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self, TypeAlias

import httpx

from gpufleet.kcache.auth import RegistryAuth, is_loopback, pull_scopes, push_scopes
from gpufleet.kcache.credentials import Credentials, docker_credentials
from gpufleet.kcache.errors import (
    DigestMismatchError,
    KcacheError,
    NotFoundError,
    RegistryError,
)
from gpufleet.kcache.reference import check_digest, check_repository, check_tag, is_digest
from gpufleet.kcache.session import DEFAULT_DEADLINE, Content, RegistrySession

__all__ = [
    "DOCKER_MANIFEST",
    "MANIFEST_TYPES",
    "MAX_MANIFEST_BYTES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "OCTET_STREAM",
    "Descriptor",
    "ProgressCallback",
    "RegistryClient",
    "sha256_digest",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCTET_STREAM = "application/octet-stream"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST)
# Manifests are read whole; real ones are kilobytes, so a bigger one is an attack.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_READ_SIZE = 1024 * 1024


def sha256_digest(data: bytes) -> str:
    """The OCI digest (``sha256:<hex>``) of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What a manifest says about a blob: its media type, digest and size."""

    media_type: str
    digest: str
    size: int


ProgressCallback: TypeAlias = Callable[[int], None]
"""Told the bytes of a blob sent so far (again from 0 when a body is sent again)."""


class RegistryClient:
    """One registry, over one HTTP connection pool; use as a context manager or ``close()``.

    ``plain_http``: None picks HTTP for loopback hosts and HTTPS otherwise; True
    forces HTTP (check it first with `kcache.auth.check_plain_http`); False forces HTTPS.
    Credentials: ``username``/``password``, else docker ``config.json``, else none;
    they go only to the registry's own scheme, host and port.
    ``timeout`` bounds each connect and read; ``deadline`` (seconds, None for
    none) bounds everything the client does from its creation on, so make one
    client per pull or push, as the CLI does.
    """

    def __init__(
        self,
        registry: str,
        *,
        plain_http: bool | None = None,
        docker_config: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 60.0,
        deadline: float | None = DEFAULT_DEADLINE,
        chunk_size: int = 8 * 1024 * 1024,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise KcacheError(f"credentials for {registry}: a username needs a password")
        if chunk_size <= 0:
            raise KcacheError(f"chunk_size must be positive, not {chunk_size}")
        if deadline is not None and not deadline > 0:
            raise KcacheError(f"the deadline must be a positive number of seconds, not {deadline}")
        self.deadline = deadline
        self.registry = registry
        self.chunk_size = chunk_size
        scheme = (
            "http" if (is_loopback(registry) if plain_http is None else plain_http) else "https"
        )
        credentials: Credentials | str | None
        if username is not None and password is not None:
            credentials = Credentials(username, password, "the given username/password")
        else:
            credentials = docker_credentials(registry, docker_config)
        self._session = RegistrySession(
            registry, f"{scheme}://{registry}", RegistryAuth(registry, credentials),
            timeout=timeout, deadline=deadline, transport=transport,
        )  # fmt: skip

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path without its query) of each HTTP request sent, oldest first.

        Token requests and redirect hops included; the last
        `kcache.session.REQUEST_LOG_SIZE` are kept.
        """
        return self._session.requests

    def close(self) -> None:
        """Close the connection pool."""
        self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- blobs ------------------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether ``repository`` has blob ``digest`` (a HEAD request)."""
        return self._blob_exists(repository, digest, pull_scopes(check_repository(repository)))

    def _blob_exists(self, repository: str, digest: str, scopes: tuple[str, ...]) -> bool:
        what = f"blob {check_digest(digest)} in {repository}"
        url = self._session.url(f"{repository}/blobs/{digest}")
        response = self._session.send("HEAD", url, scopes=scopes, what=what)
        response.close()
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._session.fail(response, what)

    def push_blob(
        self,
        repository: str,
        data: bytes | Path,
        digest: str | None = None,
        *,
        mount_from: str | None = None,
        chunked: bool | None = None,
        media_type: str = OCTET_STREAM,
        progress: ProgressCallback | None = None,
    ) -> Descriptor:
        """Upload a blob unless ``repository`` has it; returns its descriptor.

        HEAD first; then a cross-repository mount from ``mount_from`` when given;
        then a monolithic PUT, or PATCH chunks of ``chunk_size`` when the blob is
        larger (or ``chunked``). A file is streamed, never read whole; without
        ``digest`` it is hashed in one extra pass. The registry's
        ``Docker-Content-Digest`` must match. ``progress`` is told the bytes
        sent so far as the upload goes (all of them when none need sending).
        """
        tell: ProgressCallback = progress or (lambda _: None)
        check_repository(repository)
        if isinstance(data, Path):
            size = data.stat().st_size
            if digest is None:
                digest = _file_digest(data)
        else:
            size = len(data)
            actual = sha256_digest(data)
            if digest is not None and digest != actual:
                raise DigestMismatchError(
                    f"blob for {repository} claims {digest} but its content hashes to {actual}"
                )
            digest = actual
        check_digest(digest)
        descriptor = Descriptor(media_type, digest, size)
        what = f"upload of blob {digest} to {repository}"
        scopes = push_scopes(repository)
        if self._blob_exists(repository, digest, scopes):
            tell(size)
            return descriptor
        params: dict[str, str] = {}
        if mount_from is not None and mount_from != repository:
            scopes += pull_scopes(check_repository(mount_from))
            params = {"mount": digest, "from": mount_from}
        response = self._session.send(
            "POST", httpx.URL(self._session.url(f"{repository}/blobs/uploads/"), params=params),
            scopes=scopes, what=what,
        )  # fmt: skip
        response.close()
        if response.status_code == 201 and params:
            self._check_stored(response, digest, what)
            tell(size)
            return descriptor
        # 202 also answers a mount the registry would not do: it opened an upload instead.
        if response.status_code != 202:
            raise self._session.fail(response, what)
        location = self._location(response, what)
        if chunked or (chunked is None and size > self.chunk_size):
            location = self._upload_chunks(location, data, size, scopes, what, tell)
            final: Content = None
            headers = {"Content-Length": "0"}
        else:
            final = (
                data
                if isinstance(data, bytes)
                else (lambda: _told(_read_file(data, 0, size), tell))
            )
            headers = {"Content-Type": OCTET_STREAM, "Content-Length": str(size)}
        put_url = location.copy_merge_params({"digest": digest})
        response = self._session.send(
            "PUT", put_url, scopes=scopes, what=what, headers=headers, content=final
        )
        response.close()
        if response.status_code != 201:
            raise self._session.fail(response, what)
        self._check_stored(response, digest, what)
        tell(size)
        return descriptor

    def _upload_chunks(
        self,
        location: httpx.URL,
        data: bytes | Path,
        size: int,
        scopes: tuple[str, ...],
        what: str,
        tell: ProgressCallback,
    ) -> httpx.URL:
        offset = 0
        while offset < size:
            end = min(offset + self.chunk_size, size)
            # One chunk in memory at a time (chunk_size bounds it), so it can be resent.
            chunk = data[offset:end] if isinstance(data, bytes) else _read_range(data, offset, end)
            headers = {
                "Content-Type": OCTET_STREAM,
                "Content-Length": str(end - offset),
                "Content-Range": f"{offset}-{end - 1}",
            }
            response = self._session.send(
                "PATCH", location, scopes=scopes, what=what, headers=headers, content=chunk
            )
            response.close()
            if response.status_code != 202:
                raise self._session.fail(response, what)
            location = self._location(response, what)
            offset = end
            tell(offset)
        return location

    def _location(self, response: httpx.Response, what: str) -> httpx.URL:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.registry} sent no upload Location for {what}")
        # Another origin gets the upload but no credentials (see _send); HTTP after HTTPS,
        # nothing at all.
        target = response.url.join(location)
        self._session.refuse_downgrade(response.url, target, f"the upload session for {what}")
        return target

    def _check_stored(self, response: httpx.Response, digest: str, what: str) -> None:
        stored = response.headers.get("Docker-Content-Digest")
        if stored is not None and stored != digest:
            raise DigestMismatchError(
                f"registry {self.registry} stored {stored} for {what}, not {digest}"
            )

    def iter_blob(
        self, repository: str, digest: str, *, size: int | None = None
    ) -> Iterator[bytes]:
        """Stream blob ``digest``; after the last chunk, raise `DigestMismatchError` if it lied.

        With ``size`` (the descriptor's), a ``Content-Length`` over it is refused
        before the body is read, and reading stops at the first chunk that would
        pass it: at most ``size`` bytes are handed on, and at most one socket
        read (64 KiB) more is taken from the registry. A body shorter than
        ``size`` is refused too. Whatever a caller did with the chunks is
        garbage when an error comes.
        """
        what = f"blob {check_digest(digest)} in {check_repository(repository)}"
        if size is not None and size < 0:
            raise RegistryError(f"{what}: a negative size {size} in its descriptor")
        url = self._session.url(f"{repository}/blobs/{digest}")
        # Identity: the digest names the raw bytes, and a compressed body is a decompression bomb.
        response = self._session.send(
            "GET", url, scopes=pull_scopes(repository), what=what,
            headers={"Accept-Encoding": "identity"}, stream=True, follow=True,
        )  # fmt: skip
        received = 0
        try:
            if response.status_code != 200:
                raise self._session.fail(response, what)
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise RegistryError(
                    f"{what} at {self.registry}: sent with Content-Encoding {encoding!r}, "
                    "which was not asked for"
                )
            if size is not None:
                self._check_length(response, size, what)
            hasher = hashlib.sha256()
            # Raw: chunks as the socket gives them, so a size check stops within one read.
            # (An in-memory transport hands over a body httpx has read already.)
            chunks = (
                iter((response.content,)) if response.is_stream_consumed else (response.iter_raw())
            )
            for chunk in chunks:
                received += len(chunk)
                if size is not None and received > size:
                    raise RegistryError(
                        f"{what} at {self.registry} is longer than its descriptor says: "
                        f"more than the {size} bytes declared"
                    )
                hasher.update(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            raise RegistryError(f"reading {what} from {self.registry}: {exc}") from exc
        finally:
            response.close()
        if size is not None and received != size:
            raise DigestMismatchError(
                f"{what} at {self.registry} ended after {received} of the {size} bytes "
                "its descriptor declares"
            )
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise DigestMismatchError(
                f"{what} at {self.registry} is corrupt or tampered with: "
                f"its content hashes to {actual}"
            )

    def _check_length(self, response: httpx.Response, size: int, what: str) -> None:
        """Refuse, before reading the body, a ``Content-Length`` that is not the descriptor's."""
        length = response.headers.get("Content-Length")
        if length is None:
            return
        if not length.isascii() or not length.isdigit() or int(length) != size:
            raise RegistryError(
                f"{what} at {self.registry}: Content-Length {length[:40]!r} is not "
                f"the {size} bytes its descriptor declares"
            )

    def pull_blob(
        self, repository: str, digest: str, sink: BinaryIO, *, size: int | None = None
    ) -> int:
        """Stream blob ``digest`` into ``sink``; returns the bytes written.

        ``size`` bounds it as in `iter_blob`: no more than ``size`` bytes reach
        ``sink``. Raises `DigestMismatchError` at the end when the content does
        not match: the caller must then treat what it wrote as garbage.
        """
        written = 0
        for chunk in self.iter_blob(repository, digest, size=size):
            sink.write(chunk)
            written += len(chunk)
        return written

    # -- manifests --------------------------------------------------------------------------

    def push_manifest(
        self, repository: str, reference: str, manifest: bytes, media_type: str
    ) -> str:
        """Put ``manifest`` under ``reference`` (a tag or its digest); returns its digest."""
        digest = sha256_digest(manifest)
        what = f"manifest {reference} in {check_repository(repository)}"
        if reference.startswith("sha256:") and reference != digest:
            raise DigestMismatchError(f"{what}: the manifest's content hashes to {digest}")
        response = self._session.send(
            "PUT", self._session.url(f"{repository}/manifests/{self._reference(reference)}"),
            scopes=push_scopes(repository), what=what,
            headers={"Content-Type": media_type}, content=manifest,
        )  # fmt: skip
        response.close()
        if response.status_code != 201:
            raise self._session.fail(response, what)
        self._check_stored(response, digest, what)
        return digest

    def get_manifest(
        self, repository: str, reference: str, *, accept: tuple[str, ...] = MANIFEST_TYPES
    ) -> tuple[bytes, str, str]:
        """Fetch a manifest by tag or digest: (bytes, media type, digest).

        By digest, the bytes must hash to it; by tag, to the registry's
        ``Docker-Content-Digest`` when it sends one. Else `DigestMismatchError`.
        """
        what = f"manifest {reference} in {check_repository(repository)}"
        response = self._session.send(
            "GET", self._session.url(f"{repository}/manifests/{self._reference(reference)}"),
            scopes=pull_scopes(repository), what=what,
            headers={"Accept": ", ".join(accept)}, stream=True,
        )  # fmt: skip
        data = self._read_manifest(response, what)
        digest = sha256_digest(data)
        expected: str | None = response.headers.get("Docker-Content-Digest")
        if reference.startswith("sha256:"):
            expected = reference
        if expected is not None and expected != digest:
            raise DigestMismatchError(
                f"{what} at {self.registry} should be {expected} but its content hashes to {digest}"
            )
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in accept:
            media_type = _declared_media_type(data) or media_type
        return data, media_type, digest

    def _read_manifest(self, response: httpx.Response, what: str) -> bytes:
        """The body of a 200 answer, at most `MAX_MANIFEST_BYTES`; else the error it is."""
        try:
            if response.status_code != 200:
                raise self._session.fail(response, what)
            body = bytearray()
            for chunk in response.iter_bytes(_READ_SIZE):
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise RegistryError(
                        f"{what} at {self.registry} is larger than {MAX_MANIFEST_BYTES} bytes"
                    )
        except httpx.HTTPError as exc:
            raise RegistryError(f"reading {what} from {self.registry}: {exc}") from exc
        finally:
            response.close()
        return bytes(body)

    def get_referrers(
        self, repository: str, digest: str, *, artifact_type: str | None = None
    ) -> bytes | None:
        """The OCI 1.1 referrers index of manifest ``digest`` (bytes, bounded like a manifest).

        None when the registry answers 404 (the distribution spec's way of
        saying it has no referrers API; 400 and 405, which some registries send
        for an endpoint they do not know, count too): then the referrers tag
        schema applies (`kcache.referrers`). ``artifact_type`` asks the registry
        to filter; it may not, so filter what comes back.
        """
        what = f"referrers of {check_digest(digest)} in {check_repository(repository)}"
        params = {} if artifact_type is None else {"artifactType": artifact_type}
        response = self._session.send(
            "GET", httpx.URL(self._session.url(f"{repository}/referrers/{digest}"), params=params),
            scopes=pull_scopes(repository), what=what, headers={"Accept": OCI_INDEX}, stream=True,
        )  # fmt: skip
        if response.status_code in (400, 404, 405):
            response.close()
            return None
        return self._read_manifest(response, what)

    def resolve(self, repository: str, reference: str) -> str | None:
        """The digest ``reference`` (a tag or digest) points at; None when absent."""
        what = f"manifest {reference} in {check_repository(repository)}"
        response = self._session.send(
            "HEAD", self._session.url(f"{repository}/manifests/{self._reference(reference)}"),
            scopes=pull_scopes(repository), what=what,
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )  # fmt: skip
        response.close()
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._session.fail(response, what)
        digest: str | None = response.headers.get("Docker-Content-Digest")
        if digest is None or not is_digest(digest):
            # Not every registry names the digest on HEAD: hash the manifest itself.
            try:
                return self.get_manifest(repository, reference)[2]
            except NotFoundError:
                return None
        return digest

    def delete_manifest(self, repository: str, digest: str) -> None:
        """Delete the manifest ``digest`` (and so every tag pointing at it)."""
        what = f"manifest {check_digest(digest)} in {check_repository(repository)}"
        response = self._session.send(
            "DELETE", self._session.url(f"{repository}/manifests/{digest}"),
            scopes=(f"repository:{repository}:delete", *push_scopes(repository)), what=what,
        )  # fmt: skip
        response.close()
        if response.status_code not in (200, 202):
            raise self._session.fail(response, what)

    @staticmethod
    def _reference(reference: str) -> str:
        if reference.startswith("sha256:"):
            return check_digest(reference)
        return check_tag(reference)


def _declared_media_type(data: bytes) -> str | None:
    try:
        declared = json.loads(data).get("mediaType")
    except (ValueError, AttributeError, RecursionError):
        return None
    return declared if isinstance(declared, str) else None


def _told(chunks: Iterator[bytes], tell: ProgressCallback) -> Iterator[bytes]:
    """`chunks`, telling `tell` the bytes handed on so far after each one."""
    done = 0
    for chunk in chunks:
        yield chunk
        done += len(chunk)
        tell(done)


def _read_file(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        file.seek(start)
        remaining = end - start
        while remaining > 0:
            chunk = file.read(min(_READ_SIZE, remaining))
            if not chunk:
                raise KcacheError(f"{path} shrank while it was being uploaded")
            remaining -= len(chunk)
            yield chunk


def _read_range(path: Path, start: int, end: int) -> bytes:
    return b"".join(_read_file(path, start, end))


def _file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_READ_SIZE):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()
