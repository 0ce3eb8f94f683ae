"""Kubernetes plumbing: one rate-limited client, informers, exec, node identity, leases.

Features use these instead of talking to the API on their own; see
`docs/kube.md` for the design notes.
"""

from gpufleet.kube.client import Kube, KubeSettings, api_status, call_json, connect
from gpufleet.kube.errors import ExecError, ExecTimeout, KubeError, LeaseLost
from gpufleet.kube.exec import MAX_OUTPUT_BYTES, ExecResult, exec_command
from gpufleet.kube.identity import machine_id, machine_id_from_provider_id
from gpufleet.kube.lease import LeaderElector, LeaseSettings
from gpufleet.kube.ratelimit import TokenBucket
from gpufleet.kube.watch import Informer, KubeObject, object_key

__all__ = [
    "MAX_OUTPUT_BYTES",
    "ExecError",
    "ExecResult",
    "ExecTimeout",
    "Informer",
    "Kube",
    "KubeError",
    "KubeObject",
    "KubeSettings",
    "LeaderElector",
    "LeaseLost",
    "LeaseSettings",
    "TokenBucket",
    "api_status",
    "call_json",
    "connect",
    "exec_command",
    "machine_id",
    "machine_id_from_provider_id",
    "object_key",
]
