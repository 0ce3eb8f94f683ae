"""The ``gkm.io/v1alpha1`` CustomResourceDefinitions, generated from the models in `kcache.objects`.

`openapi_schema` turns a pydantic model into a structural OpenAPI v3 schema (every field
typed, wire names, the fields' lengths, patterns and literals), so the API server itself
refuses a bad image reference (no webhook, no cert-manager). `crd` wraps the schemas of
one resource into its ``CustomResourceDefinition`` (names, scope, printer columns, the
status subresource); `render_crds` is every CRD as one YAML stream, what ``gpufleet cache
crds`` prints and ``deploy/kustomize/overlays/kcache/crds.yaml`` commits. The test double
serves the same objects (``api.add_crd``). See docs/kcache-cluster.md, "API objects".
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gpufleet.kcache.cluster import (
    CACHE_RESOURCES,
    CLUSTER_CACHE,
    CLUSTER_CACHE_NODE,
    GROUP,
    NAMESPACED_CACHE,
    NAMESPACED_CACHE_NODE,
    NODE_RESOURCES,
    RESOURCES,
    VERSION,
    Resource,
)
from gpufleet.kcache.objects import CacheSpec, CacheStatus, NodeStatus
from gpufleet.kcache.patches import plain_json

__all__ = [
    "SHORT_NAMES",
    "crd",
    "openapi_schema",
    "render_crds",
]

SHORT_NAMES: dict[str, list[str]] = {
    NAMESPACED_CACHE.kind: ["gkmc"],
    CLUSTER_CACHE.kind: ["cgkmc"],
    NAMESPACED_CACHE_NODE.kind: ["gkmcn"],
    CLUSTER_CACHE_NODE.kind: ["cgkmcn"],
}
_CATEGORIES = ["gkm"]
_NAME_MAX = 63
"""Cache names are label values (``gkm.io/cache`` on node objects): a DNS-1123 label."""
_DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

_CRD_LABELS = {
    "app.kubernetes.io/name": "gpufleet-kcache",
    "app.kubernetes.io/part-of": "gpufleet",
}

_SCALARS: dict[type, str] = {str: "string", int: "integer", bool: "boolean", float: "number"}


def _type_schema(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"no OpenAPI type for the union {annotation!r}")
        return _type_schema(rest[0])
    if origin is Literal:
        if not all(isinstance(arg, str) for arg in args):
            raise TypeError(f"only string literals have an OpenAPI type: {annotation!r}")
        return {"type": "string", "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict:
        if args[1] is Any:
            return {"type": "object"}
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    if isinstance(annotation, type) and issubclass(annotation, enum.StrEnum):
        return {"type": "string", "enum": [member.value for member in annotation]}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return openapi_schema(annotation)
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    raise TypeError(f"no OpenAPI type for {annotation!r}")


_LENGTH_KEYS = {
    "string": ("minLength", "maxLength"),
    "array": ("minItems", "maxItems"),
    "object": ("minProperties", "maxProperties"),
}


def _merge(schema: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(schema.get(key), dict):
            _merge(schema[key], value)
        else:
            schema[key] = plain_json(value)


def _field_schema(info: FieldInfo) -> dict[str, Any]:
    schema = _type_schema(info.annotation)
    low, high = _LENGTH_KEYS.get(schema["type"], ("minLength", "maxLength"))
    for constraint in info.metadata:
        if isinstance(constraint, annotated_types.MinLen):
            schema[low] = constraint.min_length
        elif isinstance(constraint, annotated_types.MaxLen):
            schema[high] = constraint.max_length
        elif isinstance(constraint, annotated_types.Ge):
            schema["minimum"] = constraint.ge
        elif getattr(constraint, "pattern", None) is not None:
            schema["pattern"] = constraint.pattern
    if info.description:
        schema["description"] = info.description
    if isinstance(info.json_schema_extra, Mapping):
        _merge(schema, info.json_schema_extra)
    return schema


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of `model`: every field typed, wire names.

    Constraints come from the fields (lengths, ``ge``, patterns, literals) plus their
    ``json_schema_extra`` (formats, list types, ``x-kubernetes-preserve-unknown-fields``).
    """
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, info in model.model_fields.items():
        wire = info.alias or name
        properties[wire] = _field_schema(info)
        if info.is_required():
            required.append(wire)
    schema: dict[str, Any] = {"type": "object"}
    if model.__doc__:
        schema["description"] = " ".join(model.__doc__.split("\n\n")[0].split()).replace("`", "")
    schema["properties"] = properties
    if required:
        schema["required"] = required
    return schema


def _columns(resource: Resource) -> list[dict[str, Any]]:
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    if resource in NODE_RESOURCES:
        return [{"name": "Node", "type": "string", "jsonPath": ".status.nodeName"}, age]
    return [
        {"name": "Image", "type": "string", "jsonPath": ".spec.image"},
        {"name": "Digest", "type": "string", "jsonPath": ".status.resolvedDigest"},
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": ".status.ready",
            "description": "Nodes that have it ready / nodes whose GPUs can use it.",
        },
        {
            "name": "Verified",
            "type": "string",
            "priority": 1,
            "jsonPath": '.status.conditions[?(@.type=="Verified")].reason',
        },
        age,
    ]


_DESCRIPTIONS = {
    NAMESPACED_CACHE.kind: (
        "A kernel-cache image that pods of this namespace mount read-only through the "
        "csi.gkm.io inline volume."
    ),
    CLUSTER_CACHE.kind: (
        "A kernel-cache image that pods of every namespace may mount read-only through the "
        "csi.gkm.io inline volume."
    ),
    NAMESPACED_CACHE_NODE.kind: "How one GKMCache stands on one node; written by the node process.",
    CLUSTER_CACHE_NODE.kind: (
        "How one ClusterGKMCache stands on one node; written by the node process."
    ),
}


def crd(resource: Resource) -> dict[str, Any]:
    """The ``CustomResourceDefinition`` of `resource`, generated from the models."""
    if resource in CACHE_RESOURCES:
        spec, status = openapi_schema(CacheSpec), openapi_schema(CacheStatus)
        name_schema = {"type": "string", "maxLength": _NAME_MAX, "pattern": _DNS_LABEL_PATTERN}
        top_required = ["spec"]
    elif resource in NODE_RESOURCES:
        spec = {"type": "object", "description": "Empty: everything is in status."}
        status = openapi_schema(NodeStatus)
        name_schema = {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN_PATTERN}
        top_required = []
    else:
        raise ValueError(f"{resource.kind} is not a gkm.io resource")
    root: dict[str, Any] = {
        "type": "object",
        "description": _DESCRIPTIONS[resource.kind],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "properties": {"name": name_schema}},
            "spec": spec,
            "status": status,
        },
    }
    if top_required:
        root["required"] = top_required
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource.plural}.{GROUP}", "labels": dict(_CRD_LABELS)},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.singular,
                "shortNames": list(SHORT_NAMES[resource.kind]),
                "categories": list(_CATEGORIES),
            },
            "scope": "Namespaced" if resource.namespaced else "Cluster",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _columns(resource),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


_HEADER = """\
# The gkm.io/v1alpha1 CustomResourceDefinitions of the kernel cache.
# Generated by gpufleet.kcache.crds from the models in gpufleet.kcache.objects
# (`gpufleet cache crds`); do not edit: change the models and regenerate (a test
# fails while this file is stale).
"""


def render_crds() -> str:
    """Every CRD as one YAML stream (what ``gpufleet cache crds`` prints)."""
    documents = [
        yaml.safe_dump(crd(resource), sort_keys=False, width=4096) for resource in RESOURCES
    ]
    return _HEADER + "".join(f"---\n{document}" for document in documents)
