"""More core ``v1`` kinds: Secrets, Events, Namespaces and ServiceAccounts.

They are stored and served like pods (list, watch, get, create, replace,
patch, delete); what the real server adds on the way in is here:

- a Secret's ``stringData`` is merged into ``data`` (base64) and dropped,
  ``data`` values must be base64, and ``type`` defaults to ``Opaque``;
- a Namespace gets ``status.phase: Active``, ``spec.finalizers: [kubernetes]`` and the
  label ``kubernetes.io/metadata.name``.
  (Deleting it is immediate: there is no namespace controller, so its objects stay.)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from tests.doubles.kubeapi._objects import ApiError, JsonObject, ResourceType


def _admit_secret(secret: JsonObject) -> JsonObject:
    data = dict(secret.get("data") or {})
    for key, value in data.items():
        try:
            base64.b64decode(str(value), validate=True)
        except binascii.Error:
            raise ApiError.bad_request(
                f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data '
                f"at key {key!r}"
            ) from None
    for key, value in (secret.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data or "data" in secret:
        secret["data"] = data
    secret.setdefault("type", "Opaque")
    return secret


def _admit_namespace(namespace: JsonObject) -> JsonObject:
    meta = namespace["metadata"]
    meta["labels"] = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": meta["name"]}
    namespace.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    namespace.setdefault("status", {}).setdefault("phase", "Active")
    return namespace


SECRETS = ResourceType("secrets", "Secret", "", "v1", namespaced=True, admit=_admit_secret)
EVENTS = ResourceType("events", "Event", "", "v1", namespaced=True)
NAMESPACES = ResourceType(
    "namespaces",
    "Namespace",
    "",
    "v1",
    namespaced=False,
    subresources=("status",),
    admit=_admit_namespace,
)
SERVICE_ACCOUNTS = ResourceType("serviceaccounts", "ServiceAccount", "", "v1", namespaced=True)
CORE_KINDS = (SECRETS, EVENTS, NAMESPACES, SERVICE_ACCOUNTS)


def new_secret(
    namespace: str, name: str, data: Mapping[str, bytes], *, secret_type: str = "Opaque"
) -> JsonObject:
    """A Secret whose ``data`` holds ``data`` base64-encoded, as the server stores it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": secret_type,
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def new_namespace(name: str, labels: Mapping[str, str]) -> JsonObject:
    """A Namespace with ``labels`` (the server adds ``kubernetes.io/metadata.name``)."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": dict(labels)},
    }


def new_service_account(namespace: str, name: str) -> JsonObject:
    """A ServiceAccount (no token Secret, as since Kubernetes 1.24)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace},
    }
