"""Which machine a Kubernetes node runs on, from its `spec.providerID`.

gpuid took the last `/` segment of the providerID, which is wrong for Azure
scale sets (it gives the instance number alone, shared by every set) and
fails on nodes without a providerID. Here each cloud's format is parsed on
its own, and anything unknown or malformed falls back to the node's
`status.nodeInfo.systemUUID`, which the kubelet reads from the machine's DMI
data and is stable across reboots and node re-registration.

| providerID                                                                  | machine       |
| --------------------------------------------------------------------------- | ------------- |
| `aws:///us-east-1a/i-0abc...`                                               | `i-0abc...`   |
| `gce://project/zone/name`                                                   | `name`        |
| `azure:///subscriptions/../providers/Microsoft.Compute/virtualMachines/vm`  | `vm`          |
| `azure:///subscriptions/../virtualMachineScaleSets/set/virtualMachines/3`   | `set_3`       |
| `openstack:///<uuid>` (or `openstack://<region>/<uuid>`)                    | `<uuid>`      |
| empty, unknown (`kind://...`), malformed                                    | systemUUID    |
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from gpufleet.kube.errors import KubeError

__all__ = ["machine_id", "machine_id_from_provider_id"]

# The zone segment is optional: some tools write `aws:///i-0abc...`.
_AWS = re.compile(r"aws:///(?:[a-z0-9-]+/)?(i-[0-9a-f]{8,17})")
_GCE = re.compile(r"gce://([^/]+)/([^/]+)/([a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)")
# Azure resource IDs are case-insensitive (`resourceGroups` often arrives as
# `resourcegroups`), so match the fixed words in any case.
_AZURE_VM = re.compile(
    r"azure:///subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.compute/"
    r"virtualmachines/([^/]+)",
    re.IGNORECASE,
)
_AZURE_VMSS = re.compile(
    r"azure:///subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.compute/"
    r"virtualmachinescalesets/([^/]+)/virtualmachines/([^/]+)",
    re.IGNORECASE,
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_OPENSTACK = re.compile(rf"openstack://(?:[^/]*)/({_UUID.pattern})")


def _azure_vmss(match: re.Match[str]) -> str:
    # `<set>_<n>` is the instance's own name in Azure (and the node's hostname
    # prefix on AKS); the number alone repeats across every scale set.
    return f"{match.group(1)}_{match.group(2)}"


_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (_AWS, lambda match: match.group(1)),
    (_GCE, lambda match: match.group(3)),
    # Scale sets first: their IDs also end in `virtualMachines/<n>`.
    (_AZURE_VMSS, _azure_vmss),
    (_AZURE_VM, lambda match: match.group(1)),
    (_OPENSTACK, lambda match: match.group(1).lower()),
)


def machine_id_from_provider_id(provider_id: str) -> str | None:
    """The machine named by a providerID, or None when it is empty, unknown or malformed."""
    text = provider_id.strip()
    for pattern, extract in _RULES:
        match = pattern.fullmatch(text)
        if match is not None:
            return extract(match)
    return None


def machine_id(node: Mapping[str, Any] | Any) -> str:
    """The ID of the machine a node runs on (see the module's table).

    `node` is the node as the API's JSON (a dict with camelCase keys, what the
    informer caches), or the client's `V1Node` model (read through its
    `to_dict()`, whose keys are snake_case). Raises `KubeError` naming the node
    when neither the providerID nor the systemUUID identifies a machine.
    """
    data = _as_mapping(node)
    spec = _section(data, "spec")
    status = _section(data, "status")
    node_info = _section(status, "nodeInfo", "node_info")
    provider_id = _text(spec, "providerID", "provider_id")
    from_provider = machine_id_from_provider_id(provider_id)
    if from_provider:
        return from_provider
    system_uuid = _text(node_info, "systemUUID", "system_uuid").strip().lower()
    if system_uuid:
        return system_uuid
    name = _text(_section(data, "metadata"), "name") or "<unnamed>"
    shown = f"providerID {provider_id!r}" if provider_id else "no providerID"
    raise KubeError(f"node {name}: cannot identify its machine ({shown} and no systemUUID)")


def _as_mapping(node: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    if isinstance(node, Mapping):
        return node
    to_dict = getattr(node, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
        if isinstance(data, Mapping):
            return data
    raise TypeError(f"expected a node as a mapping or a V1Node, got {type(node).__name__}")


def _section(data: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    for key in keys:
        value = data.get(key)
        if isinstance(value, Mapping):
            return value
    return {}


def _text(data: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return ""
