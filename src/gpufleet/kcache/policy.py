"""The cluster's signature policy: which public keys a cache's image must be signed with.

The operator reads it from one Secret (``KCACHE_TRUST_SECRET``): each data key
``<name>.pub`` is a PEM EC P-256 public key (cosign's), and ``policy.yaml`` says
which of them each namespace's ``GKMCache`` and the ``ClusterGKMCache`` objects
must be signed with::

    cluster: [release]                 # ClusterGKMCache: signed by one of these
    namespaces:
      team-a: [team-a, release]        # GKMCache in team-a: one of these (team-a's own list)
      "*": [release]                   # every other namespace

A namespace's own entry replaces ``"*"`` for it (``team-b: []`` exempts team-b).
A Secret with keys but no ``policy.yaml`` trusts all its keys everywhere and
requires a signature everywhere; no keys and no ``policy.yaml``: nothing is
required. `verify_by_policy` checks an image against it in either cosign
format (``kcache.sign`` for the v2 ``.sig`` tag, ``kcache.bundle`` for the v3
bundle referrer). See docs/kcache-cluster.md, "Signature policy".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from gpufleet.kcache.errors import (
    SignatureError,
    SignedDigestMismatchError,
    TrustPolicyError,
    UnsignedError,
    UntrustedSignatureError,
)
from gpufleet.kcache.keys import SigningKeyError, parse_public_key
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.sign import verify_image_keys
from gpufleet.kcache.trust import key_names, resolve_digest

__all__ = [
    "COSIGN_V2",
    "COSIGN_V3",
    "MAX_POLICY_BYTES",
    "POLICY_KEY",
    "PUBLIC_KEY_SUFFIX",
    "SIGNATURE_FORMATS",
    "TrustPolicy",
    "Verified",
    "check_signature_format",
    "verify_by_policy",
    "verify_signed",
]

COSIGN_V2 = "cosign-v2"
"""The ``.sig`` tag format (``kcache.sign``)."""
COSIGN_V3 = "cosign-v3"
"""The OCI 1.1 Sigstore bundle referrer format (``kcache.bundle``)."""
SIGNATURE_FORMATS = (COSIGN_V2, COSIGN_V3)
POLICY_KEY = "policy.yaml"
PUBLIC_KEY_SUFFIX = ".pub"
MAX_POLICY_BYTES = 256 * 1024
"""A policy naming a few hundred namespaces is a few kilobytes; larger is a mistake."""
WILDCARD = "*"
_POLICY_FIELDS = ("cluster", "namespaces")


def check_signature_format(value: str | None, what: str) -> str | None:
    """``value`` if it is None or one of `SIGNATURE_FORMATS`; TrustPolicyError naming ``what``."""
    if value is not None and value not in SIGNATURE_FORMATS:
        raise TrustPolicyError(
            f"{what}: {value!r} is no signature format; use {' or '.join(SIGNATURE_FORMATS)}"
        )
    return value


@dataclass(frozen=True)
class TrustPolicy:
    """Trusted public keys by name, and which of them ClusterGKMCache and each namespace need.

    ``namespaces`` maps a namespace (or ``"*"``, every namespace without an
    entry of its own) to key names; every name is a key of ``keys``.
    """

    keys: Mapping[str, EllipticCurvePublicKey] = field(default_factory=dict)
    cluster: tuple[str, ...] = ()
    namespaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_secret_data(
        cls, data: Mapping[str, bytes], *, source: str = "the trust Secret"
    ) -> TrustPolicy:
        """The policy a Secret's ``.data`` (base64-decoded) holds; TrustPolicyError if malformed.

        ``source`` names the Secret in messages (``Secret gpufleet/gpufleet-kcache-trust``).
        Data keys other than ``*.pub`` and ``policy.yaml`` are ignored.
        """
        keys: dict[str, EllipticCurvePublicKey] = {}
        for data_key in sorted(data):
            if not data_key.endswith(PUBLIC_KEY_SUFFIX):
                continue
            name = data_key[: -len(PUBLIC_KEY_SUFFIX)]
            if not name:
                raise TrustPolicyError(f"{source}: data key {data_key!r} names no key")
            try:
                keys[name] = parse_public_key(data[data_key], f"{source}, data key {data_key!r}")
            except SigningKeyError as exc:
                raise TrustPolicyError(str(exc)) from None
        if POLICY_KEY not in data:
            everyone = tuple(sorted(keys))
            return cls(keys=keys, cluster=everyone, namespaces={WILDCARD: everyone} if keys else {})
        where = f"{source}, data key {POLICY_KEY!r}"
        document = _load_policy(data[POLICY_KEY], where)
        cluster = _key_list(document.get("cluster"), f"{where}: cluster", keys)
        spaces = document.get("namespaces")
        if spaces is None:
            spaces = {}
        if not isinstance(spaces, dict):
            raise TrustPolicyError(
                f'{where}: namespaces must map a namespace (or "*") to a list of key names'
            )
        namespaces: dict[str, tuple[str, ...]] = {}
        for namespace, names in spaces.items():
            if not isinstance(namespace, str) or not namespace:
                raise TrustPolicyError(f"{where}: namespace {namespace!r} is not a name")
            namespaces[namespace] = _key_list(names, f"{where}: namespaces.{namespace}", keys)
        return cls(keys=keys, cluster=cluster, namespaces=namespaces)

    def key_names_for(self, namespace: str | None) -> tuple[str, ...]:
        """The names of the keys trusted for ``namespace`` (None: ClusterGKMCache)."""
        if namespace is None:
            return self.cluster
        if namespace in self.namespaces:
            return self.namespaces[namespace]
        return self.namespaces.get(WILDCARD, ())

    def keys_for(self, namespace: str | None) -> dict[str, EllipticCurvePublicKey]:
        """The keys trusted for ``namespace`` (None: ClusterGKMCache), by name."""
        return {name: self.keys[name] for name in self.key_names_for(namespace)}

    def required(self, namespace: str | None) -> bool:
        """Whether caches of ``namespace`` (None: ClusterGKMCache) must be signed."""
        return bool(self.key_names_for(namespace))


@dataclass(frozen=True)
class Verified:
    """What `verify_by_policy` vouches for: pull ``digest``, nothing else.

    ``key_name`` and ``format`` say which trusted key verified in which format;
    both None when the policy required no signature (condition reason NotRequired).
    """

    digest: str
    key_name: str | None
    format: str | None

    @property
    def required(self) -> bool:
        """Whether a signature was required (and so verified)."""
        return self.key_name is not None


def verify_by_policy(
    client: RegistryClient,
    reference: Reference,
    policy: TrustPolicy,
    *,
    namespace: str | None,
    signature_format: str | None,
) -> Verified:
    """Resolve ``reference`` and check its signature as ``policy`` wants for ``namespace``.

    ``namespace`` None is a ClusterGKMCache. ``signature_format`` (the cache's
    ``gkm.io/signature-format`` label): ``cosign-v3`` checks the bundle
    referrer only, ``cosign-v2`` the ``.sig`` tag only, None the bundle first
    and then the tag. The digest returned is the one the tag resolved to *and*
    the signature names. Raises `UnsignedError` (no signature),
    `UntrustedSignatureError` (none by a trusted key, or one made for another
    repository), `SignedDigestMismatchError` (a trusted key signed another
    digest: the tag moved after signing); RegistryError when the registry
    fails; NotFoundError when the image does not exist. Messages name keys
    by name only.
    """
    check_signature_format(signature_format, "signature format")
    digest = resolve_digest(client, reference)
    keys = policy.keys_for(namespace)
    if not keys:
        return Verified(digest=digest, key_name=None, format=None)
    scope = "ClusterGKMCache" if namespace is None else f"namespace {namespace!r}"
    return verify_signed(
        client, reference, keys, signature_format=signature_format, image_digest=digest,
        scope=scope,
    )  # fmt: skip


def verify_signed(
    client: RegistryClient,
    reference: Reference,
    keys: Mapping[str, EllipticCurvePublicKey],
    *,
    signature_format: str | None,
    signed_repository: str | None = None,
    image_digest: str | None = None,
    scope: str | None = None,
) -> Verified:
    """Check that one of ``keys`` signed ``reference`` in ``signature_format`` (None: either).

    What `verify_by_policy` does once it knows the keys (``gpufleet cache verify``
    calls it with one). ``signed_repository`` is the v2 payload's repository
    when it is not the image's own (v3 statements name none); ``scope`` says
    in messages whose policy it is.
    """
    check_signature_format(signature_format, "signature format")
    if not keys:
        raise ValueError("verify_signed needs at least one key")
    digest = image_digest or resolve_digest(client, reference)
    formats = (signature_format,) if signature_format else (COSIGN_V3, COSIGN_V2)
    refusals: list[tuple[str, SignatureError]] = []
    for kind in formats:
        try:
            if kind == COSIGN_V2:
                _, name = verify_image_keys(
                    client, reference, keys, image_digest=digest,
                    signed_repository=signed_repository,
                )  # fmt: skip
            else:
                from gpufleet.kcache.bundle import verify_bundle_keys

                _, name = verify_bundle_keys(client, reference, keys, image_digest=digest)
        except (UnsignedError, UntrustedSignatureError, SignedDigestMismatchError) as exc:
            refusals.append((kind, exc))
        else:
            return Verified(digest=digest, key_name=name, format=kind)
    raise _refusal(refusals, reference, digest, keys, scope)


# The most telling refusal wins: a trusted key that signed something else says most.
_RANK: tuple[tuple[type[SignatureError], str], ...] = (
    (SignedDigestMismatchError, "is signed by a trusted key, but for another digest"),
    (UntrustedSignatureError, "has no valid signature by a trusted key"),
    (UnsignedError, "is unsigned"),
)


def _refusal(
    refusals: list[tuple[str, SignatureError]],
    reference: Reference,
    digest: str,
    keys: Mapping[str, EllipticCurvePublicKey],
    scope: str | None,
) -> SignatureError:
    kind, says = next(r for r in _RANK if any(isinstance(e, r[0]) for _, e in refusals))
    prefix = f"{reference} ({digest})"
    details = "; ".join(
        f"[{fmt}] {str(exc).removeprefix(prefix).removeprefix(':').strip()}"
        for fmt, exc in refusals
    )
    policy = "" if scope is None else f"signature policy for {scope}, "
    return kind(f"{prefix} {says} ({policy}trusted keys {key_names(keys)}): {details}")


def _load_policy(raw: bytes, where: str) -> dict[str, Any]:
    if len(raw) > MAX_POLICY_BYTES:
        raise TrustPolicyError(f"{where}: larger than {MAX_POLICY_BYTES} bytes")
    try:
        document = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise TrustPolicyError(f"{where}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        raise TrustPolicyError(f"{where}: not valid YAML{at}") from None
    except RecursionError:
        raise TrustPolicyError(f"{where}: nested too deeply") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise TrustPolicyError(
            f"{where}: must be a mapping with {' and/or '.join(_POLICY_FIELDS)}, "
            f"not a {type(document).__name__}"
        )
    unknown = sorted(str(k) for k in document if k not in _POLICY_FIELDS)
    if unknown:
        raise TrustPolicyError(
            f"{where}: unknown field(s) {', '.join(unknown)}; "
            f"expected {' and/or '.join(_POLICY_FIELDS)}"
        )
    return document


def _key_list(
    value: object, where: str, keys: Mapping[str, EllipticCurvePublicKey]
) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
        raise TrustPolicyError(f"{where}: must be a list of key names")
    missing = [name for name in value if name not in keys]
    if missing:
        raise TrustPolicyError(
            f"{where}: names key(s) {', '.join(repr(n) for n in missing)} that the Secret has "
            f"no {PUBLIC_KEY_SUFFIX} data for (it has: {key_names(keys) or 'none'})"
        )
    return tuple(dict.fromkeys(value))
