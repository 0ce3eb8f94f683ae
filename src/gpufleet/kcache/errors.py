"""The kernel cache feature's exceptions; every message names the file, blob or reference."""

from gpufleet.core.errors import ConfigError, GpufleetError


class KcacheError(GpufleetError):
    """A kernel cache operation failed."""


class InvalidReferenceError(KcacheError, ConfigError):
    """An argument that must name an image does not (a local path, a malformed reference).

    A usage error: the CLI exits 2, as for any configuration error.
    """


class CacheFormatError(KcacheError):
    """A cache directory (or an image's cache layer) is not a valid Triton/vLLM/Inductor cache."""


class RegistryError(KcacheError):
    """The registry refused, failed or answered something unexpected."""


class AuthError(RegistryError):
    """The registry wants credentials we do not have, or refused the ones we sent."""


class NotFoundError(RegistryError):
    """The repository, tag, manifest or blob does not exist."""


class DigestMismatchError(KcacheError):
    """Content does not match the digest that names it: tampering or corruption."""


class UnsafeArchiveError(KcacheError):
    """A layer holds something extraction refuses: an escape, a link, a device, setuid, too much."""


class SignatureError(KcacheError):
    """The image is unsigned, signed by another key, or its signature names another digest."""


class UnsignedError(SignatureError):
    """The image carries no signature at all in the format(s) looked for."""


class UntrustedSignatureError(SignatureError):
    """Signatures exist, but none verifies with a trusted key for this image and repository."""


class SignedDigestMismatchError(SignatureError):
    """A trusted key signed another digest than the one the reference resolves to now."""


class TrustPolicyError(KcacheError, ConfigError):
    """The trust Secret (public keys, ``policy.yaml``) is malformed; a configuration error."""


class VolumeError(KcacheError):
    """A CSI volume cannot be published; each subclass is answered with one gRPC status code."""


class CacheNotReadyError(VolumeError):
    """The cache is still being resolved, verified or pulled on this node (UNAVAILABLE)."""


class CacheIncompatibleError(VolumeError):
    """No GPU of this node can use the cache; the message says why (FAILED_PRECONDITION)."""


class CacheNotFoundError(VolumeError):
    """The volume names a cache that does not exist (NOT_FOUND)."""


class CacheAccessDeniedError(VolumeError):
    """The pod may not use the cache: another namespace, or refused by RBAC (PERMISSION_DENIED)."""


class InvalidVolumeError(VolumeError):
    """The request misses a field or carries a hostile attribute (INVALID_ARGUMENT)."""
