"""This node's DRA devices and the GPU UUIDs their ResourceSlices give them.

The index half of `gpufleet.exporter.podmap.resourceslices`: plain data fed
by informer events, with no Kubernetes client behind it, so the PodResources
mapping can use `DraDevice` without the `k8s` extra. See that module for how
the slices are found and watched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

__all__ = ["DraDevice", "KubeObject", "ResourceSliceIndex", "slice_devices"]

log = logging.getLogger(__name__)

KubeObject = Mapping[str, Any]
"""An object as the API serves it (JSON decoded), as `gpufleet.kube.watch` hands it over."""


@dataclass(frozen=True, slots=True, order=True)
class DraDevice:
    """One device of a DRA pool, as a claim's allocation (and PodResources) names it."""

    driver: str
    pool: str
    device: str


@dataclass(frozen=True, slots=True)
class _Slice:
    generation: int
    """The pool generation the slice belongs to: a newer one supersedes older slices."""
    uuids: Mapping[DraDevice, str]


def slice_devices(obj: KubeObject) -> dict[DraDevice, str]:
    """The devices of one ResourceSlice (the API's JSON) that carry a string ``uuid`` attribute.

    Anything malformed (a missing driver, pool or device name, attributes that
    are not objects, a ``uuid`` that is an int or empty) is left out, never
    raised: the objects come from a third-party driver.
    """
    spec = _mapping(obj.get("spec")) if isinstance(obj, Mapping) else None
    if spec is None:
        return {}
    driver, devices = spec.get("driver"), spec.get("devices")
    pool_name = (_mapping(spec.get("pool")) or {}).get("name")
    if not (_text(driver) and _text(pool_name) and isinstance(devices, list)):
        return {}
    names = ("uuid", f"{driver}/uuid")
    found: dict[DraDevice, str] = {}
    for entry in devices:
        device = _mapping(entry)
        name = device.get("name") if device is not None else None
        if device is None or not _text(name):
            continue
        uuid = _string_attribute(_attributes(device), names)
        if uuid is not None:
            found[DraDevice(driver, pool_name, name)] = uuid
    return found


def _attributes(device: Mapping[str, Any]) -> Mapping[str, Any] | None:
    attributes = _mapping(device.get("attributes"))
    if attributes is not None:
        return attributes  # v1, v1beta2
    basic = _mapping(device.get("basic"))  # v1beta1
    return _mapping(basic.get("attributes")) if basic is not None else None


def _string_attribute(attributes: Mapping[str, Any] | None, names: tuple[str, ...]) -> str | None:
    if attributes is None:
        return None
    for name in names:
        # An attribute is an object with exactly one of string, int, bool, version.
        value = _mapping(attributes.get(name)) or {}
        text = value.get("string")
        if _text(text):
            return text
    return None


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def _text(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value != ""


def _generation(obj: KubeObject) -> int:
    pool = _mapping((_mapping(obj.get("spec")) or {}).get("pool"))
    generation = pool.get("generation") if pool is not None else None
    # bool is an int to Python; a generation never is.
    return generation if isinstance(generation, int) and not isinstance(generation, bool) else 0


def _name(obj: KubeObject) -> str:
    metadata = _mapping(obj.get("metadata")) if isinstance(obj, Mapping) else None
    name = metadata.get("name") if metadata is not None else None
    return name if isinstance(name, str) else ""


class ResourceSliceIndex:
    """(driver, pool, device) -> GPU or MIG UUID, kept by a ResourceSlice informer's events.

    When two slices name the same device (a pool being republished under a new
    generation), the slice of the newer pool generation wins.
    """

    def __init__(self) -> None:
        self._slices: dict[str, _Slice] = {}
        self._uuids: dict[DraDevice, str] = {}
        self.generation = 0
        """Moves on every change of the map, so cached lookups know to ask again."""

    def __len__(self) -> int:
        return len(self._uuids)

    def uuid(self, device: DraDevice) -> str | None:
        """The UUID the driver published for ``device``; None while no slice names it."""
        return self._uuids.get(device)

    def items(self) -> dict[DraDevice, str]:
        """A copy of the whole map."""
        return dict(self._uuids)

    def upsert(self, obj: KubeObject) -> None:
        """Index (or re-index) one ResourceSlice; devices it no longer lists are forgotten."""
        name = _name(obj)
        if not name:
            return
        fresh = _Slice(_generation(obj), slice_devices(obj))
        if self._slices.get(name) == fresh:
            return
        self._slices[name] = fresh
        self._rebuild()
        log.debug(
            "ResourceSlice indexed",
            extra={"resource_slice": name, "devices_with_uuid": len(fresh.uuids)},
        )

    def remove(self, obj: KubeObject) -> None:
        """Forget a deleted ResourceSlice."""
        if self._slices.pop(_name(obj), None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        uuids: dict[DraDevice, str] = {}
        # Later entries overwrite earlier ones: the newest pool generation wins.
        for _, entry in sorted(self._slices.items(), key=lambda kv: (kv[1].generation, kv[0])):
            uuids.update(entry.uuids)
        if uuids != self._uuids:
            self._uuids = uuids
            self.generation += 1

    async def on_add(self, obj: KubeObject) -> None:
        """Informer handler."""
        self.upsert(obj)

    async def on_update(self, old: KubeObject, new: KubeObject) -> None:
        """Informer handler: a driver republishes a slice when its devices change."""
        self.upsert(new)

    async def on_delete(self, obj: KubeObject) -> None:
        """Informer handler."""
        self.remove(obj)
