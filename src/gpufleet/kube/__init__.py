"""Kubernetes plumbing: one rate-limited client, informers, exec, node identity, leases.

Features use these instead of talking to the API on their own; see
`docs/kube.md` for the design notes.

- `client`: the connection, with one rate limiter (`ratelimit`, a token bucket for
  ``QPS``/``BURST``) in front of every call;
- `watch`: informers, a local cache kept current by list+watch;
- `exec`: a command in a container over the exec websocket;
- `identity`: which machine a node runs on, from its providerID;
- `lease`: leader election on a Lease;
- `settings`: the client's and leader election's settings; `errors` the exceptions.

The names below are imported on first use, so that importing
`gpufleet.kube.settings` (which a feature's settings model does) does not need
`kubernetes_asyncio`, the `k8s` extra.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Kube": "client",
    "KubeSettings": "settings",
    "api_status": "client",
    "call_json": "client",
    "connect": "client",
    "ExecError": "errors",
    "ExecTimeout": "errors",
    "KubeError": "errors",
    "LeaseLost": "errors",
    "MAX_OUTPUT_BYTES": "exec",
    "ExecResult": "exec",
    "exec_command": "exec",
    "machine_id": "identity",
    "machine_id_from_provider_id": "identity",
    "LeaderElector": "lease",
    "LeaseSettings": "settings",
    "TokenBucket": "ratelimit",
    "Informer": "watch",
    "KubeObject": "watch",
    "object_key": "watch",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
