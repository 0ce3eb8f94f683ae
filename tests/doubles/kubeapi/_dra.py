"""``resource.k8s.io`` ResourceSlices: the versions they are served at, and builders.

The store keeps a ResourceSlice once, in its ``v1`` shape, as etcd keeps one
object whatever version a client asks for; each served version is a view of it.
The only difference our readers meet between the versions is where a device's
fields are: at ``spec.devices[]`` itself in ``v1`` and ``v1beta2``, and one
level down, at ``spec.devices[].basic``, in ``v1beta1``.

This module needs nothing else of the double, so ``_objects`` can import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gpufleet.gpu.sim import SimFleet

JsonObject = dict[str, Any]

GROUP = "resource.k8s.io"
RESOURCE_SLICE_VERSIONS = ("v1", "v1beta2", "v1beta1")
"""Every version the double can serve ResourceSlices at (Kubernetes 1.34 serves all three)."""

NVIDIA_GPU_DRIVER = "gpu.nvidia.com"


def convert_resource_slice(obj: JsonObject, source: str, target: str) -> JsonObject:
    """``obj`` (a ResourceSlice at version ``source``) as version ``target`` shows it.

    Returns a new top-level dict (the stored object is shared and never
    mutated); anything that is not a well-formed slice is passed through.
    """
    if not isinstance(obj, dict):
        return obj
    converted = {**obj, "apiVersion": f"{GROUP}/{target}"}
    spec = obj.get("spec")
    nested_before, nested_after = source == "v1beta1", target == "v1beta1"
    if nested_before == nested_after or not isinstance(spec, dict):
        return converted
    devices = spec.get("devices")
    if isinstance(devices, list):
        change = _nest if nested_after else _flatten
        converted["spec"] = {**spec, "devices": [change(device) for device in devices]}
    return converted


def _nest(device: Any) -> Any:
    if not isinstance(device, dict):
        return device
    return {"name": device.get("name"), "basic": {k: v for k, v in device.items() if k != "name"}}


def _flatten(device: Any) -> Any:
    if not isinstance(device, dict):
        return device
    basic = device.get("basic")
    flat = {k: v for k, v in device.items() if k != "basic"}
    if isinstance(basic, dict):
        flat.update(basic)
    return flat


def attribute(value: Any) -> Any:
    """A device attribute value as the API writes it: ``{"string": …}``, ``{"int": …}``, …

    A ``str``, ``bool`` or ``int`` is wrapped; anything else (a dict such as
    ``{"version": "12.4.0"}``, or deliberate garbage) is used exactly as given.
    """
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, str):
        return {"string": value}
    return value


def slice_device(
    name: str, attributes: Mapping[str, Any], capacity: Mapping[str, str] | None = None
) -> JsonObject:
    """One device in the ``v1`` shape; attribute values go through `attribute`."""
    device: JsonObject = {
        "name": name,
        "attributes": {key: attribute(value) for key, value in attributes.items()},
    }
    if capacity:
        device["capacity"] = {key: {"value": value} for key, value in capacity.items()}
    return device


def new_resource_slice(
    name: str,
    *,
    node_name: str,
    driver: str,
    pool: str,
    devices: Iterable[JsonObject],
    generation: int = 1,
    slice_count: int = 1,
) -> JsonObject:
    """A node-local ResourceSlice in the ``v1`` (storage) shape."""
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": driver,
            "nodeName": node_name,
            "pool": {"name": pool, "generation": generation, "resourceSliceCount": slice_count},
            "devices": list(devices),
        },
    }


def gpu_slice_devices(fleet: SimFleet) -> list[JsonObject]:
    """The devices NVIDIA's DRA driver would publish for ``fleet``.

    A GPU in MIG mode is published as its MIG devices, any other GPU whole.
    Names follow the driver's pattern (``gpu-<index>``, ``gpu-<index>-mig-…``)
    but are opaque to every reader: only the ``uuid`` attribute says which
    device is which.
    """
    devices: list[JsonObject] = []
    for index, gpu in enumerate(fleet.gpus):
        bus_id = _pcie_bus_id(gpu.pci_bus_id)
        common: dict[str, Any] = {
            "productName": gpu.name,
            "brand": "Nvidia",
            "pcieBusID": bus_id,
            "driverVersion": {"version": _semver(fleet.driver_version)},
        }
        if not gpu.mig_enabled:
            devices.append(
                slice_device(
                    f"gpu-{index}",
                    {"type": "gpu", "uuid": gpu.uuid, "index": index, "minor": index, **common},
                    {"memory": str(gpu.memory_total_bytes or 0)},
                )
            )
            continue
        for mig in gpu.mig_instances:
            devices.append(
                slice_device(
                    f"gpu-{index}-mig-{mig.gpu_instance_id}-{mig.compute_instance_id}",
                    {
                        "type": "mig",
                        "uuid": mig.uuid,
                        "parentUUID": gpu.uuid,
                        "profile": mig.profile,
                        "parentIndex": index,
                        **common,
                    },
                    {"memory": str(mig.memory_total_bytes)},
                )
            )
    return devices


def _pcie_bus_id(nvml_bus_id: str) -> str:
    # NVML writes an 8-digit domain ("00000000:18:00.0"); sysfs, and the driver, 4.
    domain, _, rest = nvml_bus_id.partition(":")
    return f"{domain[-4:]}:{rest}".lower() if rest else nvml_bus_id.lower()


def _semver(version: str) -> str:
    parts = [str(int(part)) for part in version.split(".") if part.isdigit()]
    return ".".join([*parts, "0", "0", "0"][:3])
