"""What a ``NodePublishVolume`` asks for, read strictly from its volume context.

The kubelet fills the volume context of an inline ephemeral volume with the pod's volume
attributes (``csi.gkm.io/...``, chosen by whoever wrote the pod) and, because the CSIDriver says
``podInfoOnMount: true``, the pod's identity (``csi.storage.k8s.io/pod.{name,namespace,uid}``,
``serviceAccount.name``) and ``csi.storage.k8s.io/ephemeral: "true"``. The pod writer controls
the first part only; the namespace boundary rests on the second.

Which cache: exactly one of ``csi.gkm.io/GKMCache`` and ``csi.gkm.io/ClusterGKMCache``.
``csi.gkm.io/namespace`` goes with ``GKMCache``; GKM's form, ``GKMCache`` without a namespace,
names a ClusterGKMCache. An unknown ``csi.gkm.io/`` key is refused rather than ignored: a typo
such as ``csi.gkm.io/Namespace`` would otherwise turn a namespaced cache into a cluster one.
Names must be DNS-1123 (no ``/``, no ``..``). Every refusal is an `InvalidVolumeError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gpufleet.kcache.cluster import (
    ATTR_CLUSTER_CACHE,
    ATTR_NAMESPACE,
    ATTR_NAMESPACED_CACHE,
    CSI_DRIVER,
    POD_INFO_NAME,
    POD_INFO_NAMESPACE,
    POD_INFO_SERVICE_ACCOUNT,
    POD_INFO_UID,
    VOLUME_EPHEMERAL,
    CacheKey,
    PodInfo,
)
from gpufleet.kcache.errors import InvalidVolumeError

__all__ = ["VolumeAttributes", "check_volume_id", "read_volume_context"]

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SUBDOMAIN_MAX = 253
_POD_UID = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,62}[A-Za-z0-9])?")
_VOLUME_ID = re.compile(r"[!-~]{1,256}")  # printable ASCII, no space: the kubelet's csi-<hex>
_OURS = f"{CSI_DRIVER}/"
_KNOWN = frozenset({ATTR_NAMESPACED_CACHE, ATTR_CLUSTER_CACHE, ATTR_NAMESPACE})
_POD_KEYS = (POD_INFO_NAME, POD_INFO_NAMESPACE, POD_INFO_UID, POD_INFO_SERVICE_ACCOUNT)


@dataclass(frozen=True, slots=True)
class VolumeAttributes:
    """The cache a volume names, the pod it is for, and the namespace the pod wrote (if any)."""

    cache: CacheKey
    pod: PodInfo
    namespace_attribute: str | None
    """``csi.gkm.io/namespace`` as written; it must be the pod's namespace (PERMISSION_DENIED)."""


def check_volume_id(volume_id: str) -> None:
    """`InvalidVolumeError` unless `volume_id` is 1..256 printable ASCII characters."""
    if not volume_id:
        raise InvalidVolumeError("volume_id is required")
    if not _VOLUME_ID.fullmatch(volume_id):
        raise InvalidVolumeError(
            "volume_id must be 1 to 256 printable ASCII characters without spaces"
        )


def _subdomain(key: str, value: str) -> str:
    if len(value) > _SUBDOMAIN_MAX or not _DNS_SUBDOMAIN.fullmatch(value):
        raise InvalidVolumeError(
            f"{key}={value[:_SUBDOMAIN_MAX]!r} is not a DNS-1123 subdomain (lower-case"
            " alphanumerics, '-' and single '.' between them, at most 253 characters)"
        )
    return value


def _label(key: str, value: str) -> str:
    if not _DNS_LABEL.fullmatch(value):
        raise InvalidVolumeError(
            f"{key}={value[:_SUBDOMAIN_MAX]!r} is not a DNS-1123 label (at most 63 lower-case"
            " alphanumerics and '-')"
        )
    return value


def _pod(context: Mapping[str, str]) -> PodInfo:
    missing = [key for key in _POD_KEYS if not context.get(key)]
    if missing:
        raise InvalidVolumeError(
            f"volume_context lacks {', '.join(missing)}: the CSIDriver {CSI_DRIVER} must have"
            " podInfoOnMount: true"
        )
    uid = context[POD_INFO_UID]
    if not _POD_UID.fullmatch(uid):
        raise InvalidVolumeError(f"{POD_INFO_UID}={uid[:80]!r} is not a pod uid")
    return PodInfo(
        namespace=_label(POD_INFO_NAMESPACE, context[POD_INFO_NAMESPACE]),
        name=_subdomain(POD_INFO_NAME, context[POD_INFO_NAME]),
        uid=uid,
        service_account=_subdomain(POD_INFO_SERVICE_ACCOUNT, context[POD_INFO_SERVICE_ACCOUNT]),
    )


def read_volume_context(context: Mapping[str, str]) -> VolumeAttributes:
    """The cache and pod of an inline ephemeral volume; `InvalidVolumeError` if anything is off."""
    if context.get(VOLUME_EPHEMERAL) != "true":
        raise InvalidVolumeError(
            f"{CSI_DRIVER} serves inline ephemeral volumes only ({VOLUME_EPHEMERAL} must be"
            ' "true": a csi volume in the pod spec, not a PersistentVolume)'
        )
    pod = _pod(context)
    unknown = sorted(k for k in context if k.startswith(_OURS) and k not in _KNOWN)
    if unknown:
        raise InvalidVolumeError(
            f"unknown volume attribute {unknown[0][:80]!r}; {CSI_DRIVER} knows "
            f"{', '.join(sorted(_KNOWN))}"
        )
    namespaced, clustered = context.get(ATTR_NAMESPACED_CACHE), context.get(ATTR_CLUSTER_CACHE)
    if (namespaced is None) == (clustered is None):
        raise InvalidVolumeError(
            f"name exactly one cache: {ATTR_NAMESPACED_CACHE} (with {ATTR_NAMESPACE}) or"
            f" {ATTR_CLUSTER_CACHE}"
        )
    namespace = context.get(ATTR_NAMESPACE)
    if namespace is not None:
        _label(ATTR_NAMESPACE, namespace)
    if clustered is not None:
        if namespace is not None:
            raise InvalidVolumeError(
                f"{ATTR_CLUSTER_CACHE} is cluster-scoped: it takes no {ATTR_NAMESPACE}"
            )
        cache = CacheKey("ClusterGKMCache", None, _subdomain(ATTR_CLUSTER_CACHE, clustered))
    else:
        assert namespaced is not None
        name = _subdomain(ATTR_NAMESPACED_CACHE, namespaced)
        if namespace is None:
            # GKM's form of a ClusterGKMCache: its key without a namespace.
            cache = CacheKey("ClusterGKMCache", None, name)
        else:
            cache = CacheKey("GKMCache", namespace, name)
    return VolumeAttributes(cache=cache, pod=pod, namespace_attribute=namespace)
