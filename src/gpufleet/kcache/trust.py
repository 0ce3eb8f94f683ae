"""What checking a signature of either cosign format takes, once for both.

`kcache.sign` (cosign v2, the ``.sig`` tag) and `kcache.bundle` (cosign v3, the
Sigstore bundle referrer) read different documents but check them the same way,
and `kcache.policy` picks between them:

- `resolve_digest`: the manifest digest a reference names, resolved once, so that
  every format checks its signature against the same digest;
- `BoundedSink` and `json_object`: what the registry sends is hostile until it
  verified, so a signature blob is read under a cap and parsed as one JSON object;
- `signer`: which of the trusted keys (by name) made an ECDSA P-256 signature;
- `key_names` and `summarize_failures`: messages that name keys by name only, and
  stay short whatever a hostile image holds.

See docs/kcache-sign.md.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gpufleet.kcache.errors import DigestMismatchError, KcacheError, NotFoundError, SignatureError
from gpufleet.kcache.keys import is_p256, not_p256_error

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "ECDSA_SHA256",
    "BoundedSink",
    "DigestResolver",
    "ImageReference",
    "json_object",
    "key_names",
    "resolve_digest",
    "signer",
    "summarize_failures",
]

ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
"""The signature algorithm of both formats' key-based signatures: ECDSA P-256 over SHA-256."""


class ImageReference(Protocol):
    """The parts of an image reference signing needs (`kcache.reference.Reference` has them)."""

    @property
    def registry(self) -> str: ...
    @property
    def repository(self) -> str: ...
    @property
    def tag(self) -> str | None: ...
    @property
    def digest(self) -> str | None: ...


class DigestResolver(Protocol):
    """The one registry call `resolve_digest` needs (`kcache.oci.RegistryClient` has it)."""

    def resolve(self, repository: str, reference: str, /) -> str | None: ...


def resolve_digest(client: DigestResolver, reference: ImageReference) -> str:
    """The manifest digest ``reference`` resolves to; a digest reference must match it."""
    target = reference.digest or reference.tag
    if target is None:
        raise KcacheError(f"{reference}: names neither a tag nor a digest")
    digest = client.resolve(reference.repository, target)
    if digest is None:
        raise NotFoundError(f"{reference}: no such image")
    if reference.digest is not None and digest != reference.digest:
        raise DigestMismatchError(f"{reference}: the registry answered digest {digest}")
    return digest


class BoundedSink(io.BytesIO):
    """Collects a signature blob, refusing to grow past `limit` bytes (whatever a size said).

    SignatureError ``"<what> is larger than <limit> bytes"`` on the write that would pass it.
    """

    def __init__(self, limit: int, what: str) -> None:
        super().__init__()
        self.limit = limit
        self.what = what

    def write(self, buffer: ReadableBuffer, /) -> int:
        """Append `buffer`, or raise SignatureError if it would pass the limit."""
        if self.tell() + memoryview(buffer).nbytes > self.limit:
            raise SignatureError(f"{self.what} is larger than {self.limit} bytes")
        return super().write(buffer)


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """`data` parsed as one JSON object; SignatureError naming `what` otherwise.

    Too deep a nesting is refused like any malformed document, not raised as a
    RecursionError.
    """
    try:
        document = json.loads(data)
    except RecursionError:
        raise SignatureError(f"{what} is nested too deeply") from None
    except ValueError:
        raise SignatureError(f"{what} is not JSON") from None
    if not isinstance(document, dict):
        raise SignatureError(f"{what} is not a JSON object")
    return document


def signer(
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    signature: bytes,
    data: bytes,
    algorithm: ec.ECDSA = ECDSA_SHA256,
) -> str:
    """The name of the first of `keys` whose DER `signature` over `data` verifies.

    SignatureError when none does; a key that is not P-256 is refused, by name.
    """
    for name, public_key in keys.items():
        if not is_p256(public_key):
            raise not_p256_error(public_key, f"trusted key {name!r}")
        try:
            public_key.verify(signature, data, algorithm)
        except InvalidSignature:
            continue
        return name
    raise SignatureError(f"the signature does not verify with any of the keys {key_names(keys)}")


def summarize_failures(failures: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` failures joined, and how many more there were."""
    more = f"; and {len(failures) - shown} more" if len(failures) > shown else ""
    return "; ".join(failures[:shown]) + more


def key_names(keys: Mapping[str, object]) -> str:
    """The names of ``keys`` for a message: ``'a', 'b'`` (the key material never)."""
    return ", ".join(repr(name) for name in sorted(keys))
