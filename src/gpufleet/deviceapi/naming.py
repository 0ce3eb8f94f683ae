"""How the provider names and labels the GPU objects it registers.

One job: turn what NVML reports (a UUID, a product name) and the node name into
a valid object name (a DNS-1123 label) and valid Kubernetes label values, so
that every provider derives the same name for the same GPU.
"""

from __future__ import annotations

import re

__all__ = [
    "LABEL_NODE",
    "LABEL_PRODUCT",
    "LABEL_PROVIDER",
    "PROVIDER_NAME",
    "gpu_labels",
    "gpu_name",
    "label_value",
    "provider_name",
]

LABEL_NODE = "gpufleet.io/node"
LABEL_PRODUCT = "gpufleet.io/product"
LABEL_PROVIDER = "gpufleet.io/provider"
PROVIDER_NAME = "nvml"
"""The provider label of GPUs read from a source that does not say what it is."""

_NAME_INVALID = re.compile(r"[^a-z0-9-]+")
_LABEL_INVALID = re.compile(r"[^A-Za-z0-9._-]+")


def gpu_name(uuid: str) -> str:
    """``GPU-5B9A...`` -> ``gpu-5b9a...``: the object name, a DNS-1123 label (<= 63 chars)."""
    text = uuid.strip()
    if text[:4].upper() == "GPU-":
        text = text[4:]
    body = _NAME_INVALID.sub("-", text.lower()).strip("-")
    if not body:
        raise ValueError(f"cannot derive a GPU name from UUID {uuid!r}")
    return f"gpu-{body}"[:63].rstrip("-")


def label_value(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``: a valid Kubernetes label value."""
    value = _LABEL_INVALID.sub("-", text.strip())
    value = value[:63]
    return value.strip("-._")


def provider_name(source: object) -> str:
    """The ``gpufleet.io/provider`` value for GPUs read from ``source``.

    The source's own ``kind`` (``nvml``, ``sim``, ``smi``), so simulated GPUs are
    never mistaken for real ones; ``nvml`` for a source without one.
    """
    kind = getattr(source, "kind", None)
    return label_value(kind) if isinstance(kind, str) and label_value(kind) else PROVIDER_NAME


def gpu_labels(node: str, product: str, provider: str = PROVIDER_NAME) -> dict[str, str]:
    """The labels the provider puts on each GPU it registers."""
    labels = {LABEL_NODE: label_value(node), LABEL_PROVIDER: provider}
    if label_value(product):
        labels[LABEL_PRODUCT] = label_value(product)
    return labels
