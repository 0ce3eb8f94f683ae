"""Node → machine identity, one row per providerID format."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio.client import (
    V1Node,
    V1NodeSpec,
    V1NodeStatus,
    V1NodeSystemInfo,
    V1ObjectMeta,
)

from gpufleet.kube.errors import KubeError
from gpufleet.kube.identity import machine_id

UUID = "4C4C4544-0042-3510-8052-B4C04F4E3532"
SUB = "azure:///subscriptions/0000-1111/resourceGroups/mc_rg_aks_westeurope/providers"


def node(provider_id: str | None, system_uuid: str | None = UUID) -> dict[str, Any]:
    """A node as the API's JSON."""
    data: dict[str, Any] = {"metadata": {"name": "gpu-node-1"}, "spec": {}, "status": {}}
    if provider_id is not None:
        data["spec"]["providerID"] = provider_id
    if system_uuid is not None:
        data["status"]["nodeInfo"] = {"systemUUID": system_uuid}
    return data


CASES = [
    ("aws", "aws:///us-east-1a/i-0abc1234def567890", "i-0abc1234def567890"),
    ("aws without zone", "aws:///i-0abc1234def56789", "i-0abc1234def56789"),
    ("gce", "gce://my-project/us-central1-a/gke-gpu-pool-1234", "gke-gpu-pool-1234"),
    ("azure vm", f"{SUB}/Microsoft.Compute/virtualMachines/gpu-vm-7", "gpu-vm-7"),
    (
        "azure vmss",
        f"{SUB}/Microsoft.Compute/virtualMachineScaleSets/aks-gpu-123-vmss/virtualMachines/3",
        "aks-gpu-123-vmss_3",
    ),
    (
        "azure vmss, lower-case resource words",
        "azure:///subscriptions/s/resourcegroups/rg/providers/microsoft.compute/"
        "virtualmachinescalesets/set/virtualmachines/12",
        "set_12",
    ),
    (
        "openstack",
        "openstack:///8E3B5A3C-1F2D-4C5B-9A7E-0123456789AB",
        "8e3b5a3c-1f2d-4c5b-9a7e-0123456789ab",
    ),
    (
        "openstack with region",
        "openstack://RegionOne/8e3b5a3c-1f2d-4c5b-9a7e-0123456789ab",
        "8e3b5a3c-1f2d-4c5b-9a7e-0123456789ab",
    ),
    ("kind falls back", "kind://docker/kind/kind-worker", UUID.lower()),
    ("empty falls back", "", UUID.lower()),
    ("missing falls back", None, UUID.lower()),
    ("unknown cloud falls back", "foo://bar/baz", UUID.lower()),
    ("aws without instance falls back", "aws:///us-east-1a/", UUID.lower()),
    ("aws with a non-instance id falls back", "aws:///us-east-1a/not-an-id", UUID.lower()),
    ("gce with too few segments falls back", "gce://my-project/gke-gpu-pool-1234", UUID.lower()),
    ("gce with an empty name falls back", "gce://my-project/us-central1-a/", UUID.lower()),
    ("openstack without a uuid falls back", "openstack:///not-a-uuid", UUID.lower()),
    ("azure without a vm falls back", f"{SUB}/Microsoft.Compute/virtualMachines/", UUID.lower()),
]


@pytest.mark.parametrize(
    ("provider_id", "expected"),
    [(provider_id, expected) for _, provider_id, expected in CASES],
    ids=[label for label, _, _ in CASES],
)
def test_machine_id_from_provider_id(provider_id: str | None, expected: str) -> None:
    assert machine_id(node(provider_id)) == expected


def test_a_v1node_model_is_read_like_its_json() -> None:
    model = V1Node(
        metadata=V1ObjectMeta(name="gpu-node-1"),
        spec=V1NodeSpec(provider_id="kind://docker/kind/kind-worker"),
        status=V1NodeStatus(node_info=_system_info(UUID)),
    )
    assert machine_id(model) == UUID.lower()


def test_a_node_with_neither_provider_id_nor_system_uuid_is_an_error_naming_it() -> None:
    with pytest.raises(KubeError, match="node gpu-node-1: cannot identify its machine"):
        machine_id(node("kind://docker/kind/kind-worker", system_uuid=""))


def test_something_that_is_not_a_node_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        machine_id(42)


def _system_info(system_uuid: str) -> V1NodeSystemInfo:
    # Every field is required by the model's client-side validation.
    fields = {
        name: ""
        for name in V1NodeSystemInfo.attribute_map
        if name not in {"system_uuid", "swap", "features"}
    }
    return V1NodeSystemInfo(system_uuid=system_uuid, **fields)
