"""Settings of ``gpufleet cache operator``, from the environment (flags override a few)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, SecretStr, model_validator

from gpufleet.core.config import CaseInsensitiveEnum, CommonSettings, Duration
from gpufleet.kube.settings import KubeSettings, LeaseSettings

__all__ = ["ClusterCacheAccess", "OperatorSettings"]


class ClusterCacheAccess(CaseInsensitiveEnum):
    """Who may mount a ClusterGKMCache: every pod, or pods whose ServiceAccount may ``use`` it."""

    OPEN = "open"
    RESTRICTED = "restricted"


class OperatorSettings(CommonSettings, KubeSettings, LeaseSettings):
    """The operator: how often to re-resolve, whom to trust, where it runs, how to lead.

    Leader election is on by default (the operator is a Deployment); the Lease lives in
    `NAMESPACE` unless `LEASE_NAMESPACE` says otherwise.
    """

    namespace: str = Field(default="gpufleet", min_length=1)
    kcache_resolve_interval: Duration = Field(default=300.0, gt=0)
    kcache_resolve_timeout: Duration = Field(default=60.0, gt=0)
    kcache_trust_secret: str = Field(default="gpufleet-kcache-trust", min_length=1)
    kcache_cluster_cache_access: ClusterCacheAccess = ClusterCacheAccess.OPEN
    kcache_plain_http: bool = False
    """Plain HTTP to every registry (loopback ones always are); as the node process has it."""
    registry_username: str | None = None
    registry_password: SecretStr | None = None
    server_port: int = Field(default=8080, ge=0, le=65535)
    leader_election: bool = True
    lease_name: str = Field(default="gpufleet-kcache-operator", min_length=1)

    @model_validator(mode="after")
    def _lease_in_own_namespace(self) -> Self:
        if "lease_namespace" not in self.model_fields_set:
            self.lease_namespace = self.namespace
        return self

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> Self:
        if (self.registry_username is None) != (self.registry_password is None):
            missing = "REGISTRY_PASSWORD" if self.registry_password is None else "REGISTRY_USERNAME"
            raise ValueError(f"{missing} must be set too")
        return self
