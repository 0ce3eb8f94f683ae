"""``spec.image`` → the digest nodes may pull: resolve the tag, then apply the signature policy.

The registry calls are blocking (``kcache.oci.RegistryClient``), so one resolution runs in
a worker thread with a client of its own, bounded by ``KCACHE_RESOLVE_TIMEOUT``. The trust
Secret is read again before every resolution, so a changed policy applies at the next one.

A digest reaches ``status.resolvedDigest`` only once `verify_by_policy` accepted it. When
the check refuses it, or cannot be made (registry down, unreadable Secret), the digest the
status had stays, and the Verified condition says why; nothing new reaches the nodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gpufleet.core.errors import GpufleetError
from gpufleet.kcache.cluster import CacheKey
from gpufleet.kcache.errors import (
    InvalidReferenceError,
    KcacheError,
    RegistryError,
    SignatureError,
    SignedDigestMismatchError,
    UnsignedError,
    UntrustedSignatureError,
)
from gpufleet.kcache.objects import CacheObject
from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.operator.rollup import Verdict
from gpufleet.kcache.operator.status import Resolution
from gpufleet.kcache.policy import TrustPolicy, Verified, verify_by_policy
from gpufleet.kcache.reference import Reference

__all__ = ["RegistryOptions", "Resolver", "TrustSource", "VerifyFn", "refusal_reason"]

log = logging.getLogger(__name__)

VerifyFn = Callable[..., Verified]
"""`verify_by_policy`'s signature: (client, reference, policy, *, namespace, signature_format)."""
PolicyLoader = Callable[[], Awaitable[tuple[TrustPolicy, str]]]
"""Returns the trust policy and a fingerprint of what it was built from."""


@dataclass(frozen=True, repr=False)
class RegistryOptions:
    """How to reach registries: like ``gpufleet cache``, plus the plain-HTTP allow-list."""

    plain_http: bool = False
    """HTTP to every registry; without it, loopback ones only."""
    username: str | None = None
    password: str | None = None
    timeout: float = 60.0
    """The deadline of one resolution's registry calls, all together."""

    def client(self, registry: str) -> RegistryClient:
        """A fresh client for `registry` (its deadline starts now)."""
        return RegistryClient(
            registry,
            plain_http=True if self.plain_http else None,
            username=self.username,
            password=self.password,
            timeout=min(self.timeout, 30.0),
            deadline=self.timeout,
        )


class TrustSource:
    """Reads the trust Secret (``KCACHE_TRUST_SECRET`` in ``NAMESPACE``) into a policy.

    No Secret means no key: nothing is required. A Secret that cannot be read or parsed
    raises (`GpufleetError` or the API's error): the caller then refuses new digests.
    """

    def __init__(
        self, read: Callable[[str, str], Awaitable[dict[str, bytes] | None]], namespace: str,
        name: str,
    ) -> None:  # fmt: skip
        self._read = read
        self.namespace = namespace
        self.name = name

    @property
    def where(self) -> str:
        """``Secret <namespace>/<name>``, for messages."""
        return f"Secret {self.namespace}/{self.name}"

    async def load(self) -> tuple[TrustPolicy, str]:
        """The policy and a fingerprint of the Secret's data (to notice a change)."""
        data = await self._read(self.namespace, self.name) or {}
        digest = hashlib.sha256()
        for item in sorted(data):
            digest.update(item.encode() + b"\0" + hashlib.sha256(data[item]).digest())
        return TrustPolicy.from_secret_data(data, source=self.where), digest.hexdigest()


_REFUSALS: tuple[tuple[type[SignatureError], str], ...] = (
    (UnsignedError, "Unsigned"),
    (UntrustedSignatureError, "WrongKey"),
    (SignedDigestMismatchError, "DigestMismatch"),
)


class _CheckFailed(Exception):
    """The tag resolved, but the signature could not be checked (not a refusal)."""

    def __init__(self, digest: str, error: KcacheError) -> None:
        super().__init__(str(error))
        self.digest = digest
        self.error = error


def refusal_reason(error: SignatureError) -> str:
    """The Verified condition's reason for a refusal by the policy."""
    return next((reason for kind, reason in _REFUSALS if isinstance(error, kind)), "Error")


@dataclass
class _Checked:
    """A digest the policy accepted, and what the check rested on."""

    digest: str
    fingerprint: str
    signature_format: str | None
    verdict: Verdict


@dataclass(frozen=True)
class Outcome:
    """One resolution, and whether it failed in a way worth retrying soon."""

    resolution: Resolution
    transient: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)
    """(type, reason, message) of the Events to record about it."""


class Resolver:
    """Resolves caches one at a time each (the caller serialises per cache)."""

    def __init__(
        self,
        options: RegistryOptions,
        load_policy: PolicyLoader,
        *,
        policy_source: str = "the trust Secret",
        verify: VerifyFn = verify_by_policy,
        client: Callable[[str], RegistryClient] | None = None,
    ) -> None:
        self._options = options
        self._load_policy = load_policy
        self._policy_source = policy_source
        self._verify = verify
        self._client = client or options.client
        self._checked: dict[CacheKey, _Checked] = {}

    def forget(self, key: CacheKey) -> None:
        """Drop what is remembered about the cache `key` (it was deleted)."""
        self._checked.pop(key, None)

    async def resolve(self, cache: CacheObject) -> Outcome:
        """Resolve `cache`'s image and check the signature of a digest not checked yet."""
        stored_digest = cache.status.resolved_digest
        stored_image = cache.status.resolved_image
        generation = cache.generation

        def keep(
            resolved: Verdict,
            verified: Verdict,
            *,
            transient: bool,
            events: list[tuple[str, str, str]] | None = None,
        ) -> Outcome:
            """The digest stays as stored; the conditions say why."""
            resolution = Resolution(generation, stored_digest, stored_image, resolved, verified)
            return Outcome(resolution, transient=transient, events=events or [])

        try:
            reference = Reference.parse(cache.spec.image)
            if reference.tag is None and reference.digest is None:
                reference = reference.with_tag("latest")
        except InvalidReferenceError as exc:
            return keep(
                Verdict("Resolved", False, "InvalidImage", str(exc)),
                Verdict("Verified", False, "Error", "not checked: the image reference is invalid"),
                transient=False,
            )
        policy: TrustPolicy | None = None
        fingerprint = ""
        policy_error: str | None = None
        try:
            policy, fingerprint = await self._load_policy()
        except (GpufleetError, ValueError) as exc:
            policy_error = str(exc)
        except Exception as exc:  # the API server's answer; the check cannot be made
            policy_error = f"cannot read {self._policy_source}: {type(exc).__name__}: {exc}"
        memo = cache.key
        previous = self._checked.get(memo)
        signature_format = cache.signature_format

        def work() -> tuple[str | None, Verified | None]:
            with self._client(reference.registry) as client:
                digest = client.resolve(
                    reference.repository, reference.digest or reference.tag or "latest"
                )
                if digest is None or policy is None:
                    return digest, None
                if (
                    previous is not None
                    and previous.digest == digest
                    and previous.fingerprint == fingerprint
                    and previous.signature_format == signature_format
                ):
                    return digest, None  # checked before, against the same policy
                # The policy resolves again and vouches for the digest it checked: that one
                # is published, even if the tag moved in between.
                try:
                    verified = self._verify(
                        client, reference, policy,
                        namespace=cache.key.namespace, signature_format=signature_format,
                    )  # fmt: skip
                except SignatureError:
                    raise
                except KcacheError as exc:
                    raise _CheckFailed(digest, exc) from exc
                return verified.digest, verified

        try:
            digest, verified = await asyncio.to_thread(work)
        except SignatureError as exc:
            reason = refusal_reason(exc)
            verdict = Verdict("Verified", False, reason, str(exc))
            # The tag did resolve; the digest it names is what was refused.
            return keep(
                Verdict("Resolved", True, "Resolved", f"{reference} is refused: see Verified"),
                verdict, transient=reason == "Error",
                events=[("Warning", f"Signature{reason}", str(exc))],
            )  # fmt: skip
        except _CheckFailed as failed:
            message = f"{failed.digest} not checked: {failed.error}"
            return keep(
                Verdict("Resolved", True, "Resolved", f"{reference} is {failed.digest}"),
                Verdict("Verified", False, "Error", message),
                transient=isinstance(failed.error, RegistryError),
            )
        except KcacheError as exc:
            return keep(
                Verdict("Resolved", False, "RegistryError", str(exc)),
                _carried_verified(cache, previous),
                transient=True,
            )
        if digest is None:
            return keep(
                Verdict("Resolved", False, "NotFound", f"{reference} does not exist"),
                _carried_verified(cache, previous),
                transient=False,
            )
        resolved = Verdict("Resolved", True, "Resolved", f"{reference} is {digest}")
        if policy_error is not None:
            message = f"{digest} not checked: {policy_error}"
            return keep(
                resolved, Verdict("Verified", False, "Error", message), transient=True,
                events=[("Warning", "SignatureError", message)] if digest != stored_digest else [],
            )  # fmt: skip
        if verified is None:
            assert previous is not None  # checked before against the same policy
            verdict = previous.verdict
        elif verified.key_name is None:
            scope = "ClusterGKMCaches" if cache.key.namespace is None else cache.key.namespace
            message = f"{self._policy_source} requires no key for {scope}"
            verdict = Verdict("Verified", True, "NotRequired", message)
        else:
            how = f" ({verified.format})" if verified.format else ""
            verdict = Verdict(
                "Verified", True, "Verified", f"{digest} is signed by {verified.key_name}{how}"
            )
        self._checked[memo] = _Checked(digest, fingerprint, signature_format, verdict)
        image = f"{reference.registry}/{reference.repository}@{digest}"
        events = []
        if digest != stored_digest:
            events.append(("Normal", "Resolved", f"{reference} resolved to {digest}"))
        return Outcome(Resolution(generation, digest, image, resolved, verdict), events=events)


def _carried_verified(cache: CacheObject, previous: _Checked | None) -> Verdict:
    """The Verified condition to show while the registry cannot say anything new."""
    if previous is not None:
        return previous.verdict
    stored = cache.status.condition("Verified")
    if stored is not None:
        return Verdict("Verified", stored.status == "True", stored.reason, stored.message)
    return Verdict("Verified", False, "Error", "not checked: the image did not resolve")
