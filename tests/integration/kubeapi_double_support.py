"""Shared by the ``KubeApiDouble`` contract tests: a CRD shaped like the kernel cache's, its
objects, and the next events of a watch."""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes_asyncio import watch

GROUP, VERSION = "gkm.io", "v1alpha1"
IMAGE = "registry.example/caches/vector-add:v1"


def cache_crd(kind: str = "GKMCache", *, scope: str = "Namespaced") -> dict[str, Any]:
    """A CRD shaped like the kernel cache's: a required image with a pattern and a length."""
    plural = kind.lower() + "s"
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 525,
                        "pattern": r"^[a-z0-9][a-z0-9._/:@-]*$",
                    },
                    "mode": {"type": "string", "enum": ["copy", "mount"], "default": "mount"},
                    "podTemplate": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                },
            },
            "status": {
                "type": "object",
                "properties": {
                    "resolvedDigest": {"type": "string"},
                    "observedGeneration": {"type": "integer"},
                    "conditions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "status"],
                            "properties": {
                                "type": {"type": "string"},
                                "status": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "listKind": f"{kind}List",
            },
            "scope": scope,
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def cache(name: str, image: str = IMAGE, *, kind: str = "GKMCache", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": name, **meta},
        "spec": {"image": image},
    }


async def collect(stream: watch.Watch, count: int) -> list[dict[str, Any]]:
    """The next ``count`` events of ``stream``; fails after five seconds."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        async for event in stream:
            events.append(event)
            if len(events) == count:
                break
    return events
