"""The Kubernetes plumbing layer's exception hierarchy."""

from __future__ import annotations

from gpufleet.core.errors import GpufleetError

__all__ = ["ExecError", "ExecTimeout", "KubeError", "LeaseLost"]


class KubeError(GpufleetError):
    """Base class for failures of the Kubernetes plumbing (`gpufleet.kube`)."""


class ExecError(KubeError):
    """A command run in a container failed, or could not be run at all.

    ``exit_code`` is set when the command ran and exited non-zero but the
    caller asked for it to be an error; ``status`` is the HTTP status when the
    API server refused the exec (404 pod gone, 400 container missing, 403
    forbidden). Both are None when they do not apply.
    """

    def __init__(
        self,
        message: str,
        *,
        namespace: str,
        pod: str,
        container: str,
        exit_code: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(f"exec in {namespace}/{pod} container {container}: {message}")
        self.namespace = namespace
        self.pod = pod
        self.container = container
        self.exit_code = exit_code
        self.status = status


class ExecTimeout(ExecError):
    """A command run in a container did not finish within its timeout."""

    def __init__(self, *, namespace: str, pod: str, container: str, timeout: float) -> None:
        super().__init__(
            f"timed out after {timeout:g}s", namespace=namespace, pod=pod, container=container
        )
        self.timeout = timeout


class LeaseLost(KubeError):
    """This process stopped leading: it could not renew its Lease in time, or lost it."""

    def __init__(self, namespace: str, name: str, identity: str, reason: str) -> None:
        super().__init__(f"lease {namespace}/{name}: {identity} stopped leading: {reason}")
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.reason = reason
