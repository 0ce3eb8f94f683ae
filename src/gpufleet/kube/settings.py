"""Settings of the Kubernetes plumbing: the API client and leader election.

They live apart from `client.py` and `lease.py` so that a feature's settings
model can include them without importing `kubernetes_asyncio`, which only the
`k8s` extra installs: `gpufleet --help` and the core commands work without it.
"""

from __future__ import annotations

import socket

from pydantic import Field, ValidationInfo, field_validator

from gpufleet.core.config import Duration, GpufleetSettings

__all__ = ["KubeSettings", "LeaseSettings"]


class KubeSettings(GpufleetSettings):
    """How to reach the API server, and how hard to use it (gpuid's names and defaults).

    `KUBECONFIG` is a kubeconfig path (or a `:`-separated list, as kubectl
    reads it). Without it, a process in a pod (`KUBERNETES_SERVICE_HOST` set
    by the kubelet) uses its service account; anywhere else `~/.kube/config`.
    """

    kubeconfig: str | None = None
    kubernetes_service_host: str | None = None
    qps: float = Field(default=50.0, gt=0, allow_inf_nan=False)
    burst: int = Field(default=100, ge=1)

    @field_validator("burst")
    @classmethod
    def _burst_covers_qps(cls, burst: int, info: ValidationInfo) -> int:
        # Fields validate in order, so QPS is already known here (or invalid,
        # and then reported on its own).
        qps = info.data.get("qps")
        if isinstance(qps, float) and burst < qps:
            raise ValueError(f"must be >= QPS ({qps:g})")
        return burst


class LeaseSettings(GpufleetSettings):
    """Leader election settings, with gpuid's variable names and defaults.

    `LEASE_DURATION` > `LEASE_RENEW_DEADLINE` > `LEASE_RETRY_PERIOD` > 0, so
    a leader gives up before its Lease can look expired to anyone else. The
    identity is `POD_NAME` (from the downward API), else the hostname.
    """

    leader_election: bool = False
    lease_namespace: str = Field(default="gpuid", min_length=1)
    lease_name: str = Field(default="gpuid-leader", min_length=1)
    lease_duration: Duration = Field(default=15.0, gt=0)
    lease_renew_deadline: Duration = Field(default=10.0, gt=0)
    lease_retry_period: Duration = Field(default=2.0, gt=0)
    pod_name: str | None = None

    @field_validator("lease_renew_deadline")
    @classmethod
    def _renew_deadline_below_duration(cls, value: float, info: ValidationInfo) -> float:
        duration = info.data.get("lease_duration")
        if isinstance(duration, float) and not value < duration:
            raise ValueError(f"must be less than LEASE_DURATION ({duration:g}s)")
        return value

    @field_validator("lease_retry_period")
    @classmethod
    def _retry_period_below_renew_deadline(cls, value: float, info: ValidationInfo) -> float:
        deadline = info.data.get("lease_renew_deadline")
        if isinstance(deadline, float) and not value < deadline:
            raise ValueError(f"must be less than LEASE_RENEW_DEADLINE ({deadline:g}s)")
        return value

    @property
    def identity(self) -> str:
        """Who this replica is in the Lease: `POD_NAME`, else the hostname."""
        return self.pod_name or socket.gethostname()
