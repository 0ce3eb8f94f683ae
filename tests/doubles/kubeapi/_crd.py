"""Custom resources declared by ``apiextensions.k8s.io/v1`` CustomResourceDefinitions.

A CRD is an object like any other (list, watch, get, create, replace, patch,
delete at ``/apis/apiextensions.k8s.io/v1/customresourcedefinitions``). When
one is stored, each of its served versions becomes a `ResourceType` the double
answers at ``/apis/<group>/<version>/[namespaces/<ns>/]<plural>``; the store
keeps the storage version, and the other versions differ only in
``apiVersion`` (conversion ``None``, the only strategy without a webhook).

Every write of a custom resource is admitted as the real server decodes it:
unknown fields and nulls where the schema is not ``nullable`` are pruned,
schema defaults are filled in, and the
``openAPIV3Schema`` is checked (``type``, ``required``, ``pattern``,
``minLength``/``maxLength``, ``enum``, ``minimum``/``maximum``,
``minItems``/``maxItems``, ``nullable``) against the storage version's schema.
CEL rules (``x-kubernetes-validations``) and ``format`` are not checked.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

from tests.doubles.kubeapi._objects import (
    ApiError,
    Cause,
    JsonObject,
    ResourceType,
    timestamp,
)

_ALWAYS_KEPT = ("apiVersion", "kind", "metadata")
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def _admit_crd(crd: JsonObject) -> JsonObject:
    """Check a CRD as the server does (the essentials) and set its status: Established."""
    spec = crd.get("spec") if isinstance(crd.get("spec"), dict) else {}
    names = spec.get("names") if isinstance(spec.get("names"), dict) else {}
    causes: list[Cause] = []
    for field, value in (
        ("spec.group", spec.get("group")),
        ("spec.names.plural", names.get("plural")),
        ("spec.names.kind", names.get("kind")),
    ):
        if not value:
            causes.append(Cause(field, "FieldValueRequired", "Required value"))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(
            Cause(
                "spec.scope",
                "FieldValueNotSupported",
                f'Unsupported value: "{spec.get("scope", "")}": supported values: '
                '"Cluster", "Namespaced"',
            )
        )
    versions = spec.get("versions") if isinstance(spec.get("versions"), list) else []
    if sum(1 for v in versions if isinstance(v, dict) and v.get("storage")) != 1:
        causes.append(
            Cause(
                "spec.versions",
                "FieldValueInvalid",
                "Invalid value: must have exactly one version marked as storage version",
            )
        )
    name = crd["metadata"]["name"]
    if not causes and name != f"{names['plural']}.{spec['group']}":
        causes.append(
            Cause(
                "metadata.name",
                "FieldValueInvalid",
                f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group',
            )
        )
    if causes:
        raise ApiError.invalid(CRDS, name, causes)
    accepted = {"singular": names["kind"].lower(), "listKind": f"{names['kind']}List", **names}
    now = timestamp()
    crd["status"] = {
        "acceptedNames": accepted,
        "conditions": [
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
            }
            for kind, reason, message in (
                ("NamesAccepted", "NoConflicts", "no conflicts found"),
                ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            )
        ],
        "storedVersions": [v["name"] for v in versions if v.get("storage")],
    }
    return crd


CRDS = ResourceType(
    "customresourcedefinitions",
    "CustomResourceDefinition",
    "apiextensions.k8s.io",
    "v1",
    namespaced=False,
    subresources=("status",),
    admit=_admit_crd,
)


def crd_resources(crd: JsonObject) -> list[ResourceType]:
    """Every served version of a stored (admitted) CRD, the storage version first."""
    spec = crd["spec"]
    names = spec["names"]
    versions = [v for v in spec["versions"] if v.get("served", True)]
    storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
    resources: list[ResourceType] = []
    for version in sorted(versions, key=lambda v: v["name"] != storage):
        schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
        base = ResourceType(
            names["plural"],
            names["kind"],
            spec["group"],
            version["name"],
            namespaced=spec["scope"] == "Namespaced",
            subresources=("status",) if "status" in (version.get("subresources") or {}) else (),
            convert=_convert,
            storage_version=None if version["name"] == storage else storage,
            custom=True,
        )
        resources.append(dataclasses.replace(base, admit=_admitter(base, schema)))
    return resources


def _convert(obj: JsonObject, source: str, target: str) -> JsonObject:
    """Conversion ``None``: only ``apiVersion`` changes."""
    group = str(obj.get("apiVersion", "")).rsplit("/", 1)[0]
    return {**obj, "apiVersion": f"{group}/{target}"}


def _admitter(resource: ResourceType, schema: JsonObject) -> Any:
    def admit(obj: JsonObject) -> JsonObject:
        admitted = copy.deepcopy(obj)
        causes: list[Cause] = []
        properties = schema.get("properties") or {}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            for key in [k for k in admitted if k not in properties and k not in _ALWAYS_KEPT]:
                del admitted[key]
        for key, sub in properties.items():
            if key in _ALWAYS_KEPT:
                continue
            if admitted.get(key, "") is None and not sub.get("nullable"):
                del admitted[key]
            if key not in admitted and "default" in sub:
                admitted[key] = copy.deepcopy(sub["default"])
            if key in admitted:
                admitted[key] = _check(sub, admitted[key], key, causes)
        for key in schema.get("required") or []:
            if key not in admitted:
                causes.append(Cause(key, "FieldValueRequired", "Required value"))
        if causes:
            raise ApiError.invalid(resource, obj["metadata"].get("name", ""), causes)
        return admitted

    return admit


def _check(schema: JsonObject, value: Any, path: str, causes: list[Cause]) -> Any:
    """``value`` pruned and defaulted by ``schema``; appends what is invalid to ``causes``."""
    if value is None and schema.get("nullable"):
        return value
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str) or isinstance(value, bool):
            causes.append(_type_error(path, "integer or string", value))
        return value
    if kind in _TYPES and (
        not isinstance(value, _TYPES[kind])
        or (isinstance(value, bool) and kind in ("integer", "number"))
    ):
        causes.append(_type_error(path, kind, value))
        return value
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(f'"{v}"' for v in schema["enum"])
        causes.append(
            Cause(
                path,
                "FieldValueNotSupported",
                f'Unsupported value: "{value}": supported values: {supported}',
            )
        )
    if isinstance(value, str):
        _check_string(schema, value, path, causes)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if "maximum" in schema and value > schema["maximum"]:
            causes.append(
                _invalid(path, value, f"should be less than or equal to {schema['maximum']}")
            )
        if "minimum" in schema and value < schema["minimum"]:
            causes.append(
                _invalid(path, value, f"should be greater than or equal to {schema['minimum']}")
            )
    elif isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            causes.append(
                Cause(
                    path,
                    "FieldValueTooMany",
                    f"Too many: {len(value)}: must have at most {schema['maxItems']} items",
                )
            )
        if "minItems" in schema and len(value) < schema["minItems"]:
            causes.append(_invalid(path, value, f"should have at least {schema['minItems']} items"))
        items = schema.get("items")
        if isinstance(items, dict):
            return [_check(items, v, f"{path}[{i}]", causes) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        return _check_object(schema, value, path, causes)
    return value


def _check_string(schema: JsonObject, value: str, path: str, causes: list[Cause]) -> None:
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        causes.append(
            Cause(
                path,
                "FieldValueTooLong",
                f"Too long: may not be more than {schema['maxLength']} bytes",
            )
        )
    if "minLength" in schema and len(value) < schema["minLength"]:
        causes.append(_invalid(path, value, f"should be at least {schema['minLength']} chars long"))
    if "pattern" in schema and re.search(schema["pattern"], value) is None:
        causes.append(_invalid(path, value, f"should match '{schema['pattern']}'"))


def _check_object(
    schema: JsonObject, value: JsonObject, path: str, causes: list[Cause]
) -> JsonObject:
    properties = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    result: JsonObject = {}
    for key, item in value.items():
        sub = properties.get(key, additional if isinstance(additional, dict) else None)
        if item is None and isinstance(sub, dict) and not sub.get("nullable"):
            continue  # a null that may not be null is pruned (then defaulted), not refused
        if key in properties:
            result[key] = _check(properties[key], item, f"{path}.{key}", causes)
        elif isinstance(additional, dict):
            result[key] = _check(additional, item, f"{path}.{key}", causes)
        elif (
            schema.get("x-kubernetes-preserve-unknown-fields")
            or additional is True
            or (not properties and additional is None and "type" not in schema)
        ):
            result[key] = item
        # anything else is an unknown field: pruned, as the server prunes it
    for key, sub in properties.items():
        if key not in result and isinstance(sub, dict) and "default" in sub:
            result[key] = _check(sub, copy.deepcopy(sub["default"]), f"{path}.{key}", causes)
    for key in schema.get("required") or []:
        if key not in result:
            causes.append(Cause(f"{path}.{key}", "FieldValueRequired", "Required value"))
    return result


def _type_error(path: str, wanted: str, value: Any) -> Cause:
    actual = _json_type(value)
    return Cause(
        path,
        "FieldValueTypeInvalid",
        f'Invalid value: "{actual}": {path} in body must be of type {wanted}: "{actual}"',
    )


def _invalid(path: str, value: Any, why: str) -> Cause:
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    return Cause(path, "FieldValueInvalid", f"Invalid value: {shown}: {path} in body {why}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"
