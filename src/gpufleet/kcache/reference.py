"""Image references and the OCI grammar of their parts: registry, repository, tag, digest.

`Reference.parse` reads ``registry/repository[:tag][@digest]`` the way docker
does, Docker Hub names normalised; the ``check_*`` functions hold repository
names, tags and digests to the one exact shape each may have, because they go
into URL and store paths. See docs/kcache-oci.md.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from gpufleet.kcache.errors import InvalidReferenceError, KcacheError

__all__ = [
    "DOCKER_HUB",
    "DOCKER_HUB_ALIASES",
    "Reference",
    "check_digest",
    "check_repository",
    "check_tag",
    "is_digest",
]

DOCKER_HUB = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", DOCKER_HUB})
"""The names Docker Hub goes by in references and in docker ``config.json``."""

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*"  # a name or IPv4
    r"|\[[0-9A-Fa-f:.]+\])"  # or [IPv6]
    r"(?::[0-9]{1,5})?"
)


def is_digest(text: str) -> bool:
    """Whether ``text`` is a digest as we accept them: ``sha256:<64 lowercase hex>``."""
    return _DIGEST.fullmatch(text) is not None


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:<64 lowercase hex>``; KcacheError otherwise."""
    # Digests go into URL paths and store paths: only the one exact shape passes.
    if not _DIGEST.fullmatch(digest):
        raise KcacheError(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


def check_repository(repository: str) -> str:
    """``repository`` if it is a valid OCI repository name; KcacheError otherwise."""
    if len(repository) > 255 or not _REPOSITORY.fullmatch(repository):
        raise KcacheError(
            f"invalid repository name {repository!r}: lowercase components "
            "([a-z0-9] separated by '.', '_', '__' or '-') joined by '/'"
        )
    return repository


def check_tag(tag: str) -> str:
    """``tag`` if it is a valid OCI tag; KcacheError otherwise."""
    if not _TAG.fullmatch(tag):
        raise KcacheError(f"invalid tag {tag!r}")
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """An image reference: ``registry/repository[:tag][@digest]``, docker.io normalised."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``host:5000/a/b:tag``, ``host/a/b@sha256:...`` or ``a/b`` (Docker Hub)."""

        def bad(why: str) -> InvalidReferenceError:
            return InvalidReferenceError(f"invalid image reference {text!r}: {why}")

        if not text or text != text.strip():
            raise bad("empty or surrounded by whitespace")
        name, digest = text, None
        if "@" in name:
            name, digest = name.rsplit("@", 1)
            if not _DIGEST.fullmatch(digest):
                raise bad("the digest must be sha256:<64 lowercase hex>")
        tag = None
        slash, colon = name.rfind("/"), name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise bad(f"tag {tag!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
        first, sep, rest = name.partition("/")
        # Docker's rule: the first component is a registry only if it looks like a host.
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
            if not _HOST.fullmatch(registry):
                raise bad(f"registry {registry!r} is not host[:port]")
        else:
            registry, repository = "docker.io", name
        if not repository:
            raise bad("no repository")
        if registry in DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in repository:
                repository = f"library/{repository}"
        if len(repository) > 255 or not _REPOSITORY.fullmatch(repository):
            raise bad(f"repository {repository!r} is not lowercase components joined by '/'")
        return cls(registry, repository, tag, digest)

    def with_digest(self, digest: str) -> Reference:
        """The same repository (and tag) pinned to ``digest``."""
        return dataclasses.replace(self, digest=check_digest(digest))

    def with_tag(self, tag: str) -> Reference:
        """The same repository at ``tag``, without a digest."""
        return dataclasses.replace(self, tag=check_tag(tag), digest=None)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text
