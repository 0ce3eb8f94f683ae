"""A Kubernetes API server double, on kmock, for the real ``kubernetes_asyncio`` client.

``KubeApiDouble`` serves pods, nodes, leases, ``resource.k8s.io``
ResourceSlices (at the versions a test chooses), Secrets, Events, Namespaces,
ServiceAccounts, SubjectAccessReviews and custom resources declared by CRDs
over a real loopback socket: list and watch with resourceVersions, bookmarks
and 410 Gone, optimistic concurrency on writes, generation, finalizers, the
status subresource, schema validation, and pod exec over the
``v4.channel.k8s.io`` websocket, answered by default with simulated
``nvidia-smi -q -x`` output. See
``tests/doubles/README.md`` for what kmock provides and what this adds.
"""

from tests.doubles.kubeapi._dra import (
    NVIDIA_GPU_DRIVER,
    RESOURCE_SLICE_VERSIONS,
    gpu_slice_devices,
    slice_device,
)
from tests.doubles.kubeapi._exec import ExecHandler, ExecReply, ExecRequest, exec_status
from tests.doubles.kubeapi._http import RecordedRequest
from tests.doubles.kubeapi.double import KubeApiDouble

__all__ = [
    "NVIDIA_GPU_DRIVER",
    "RESOURCE_SLICE_VERSIONS",
    "ExecHandler",
    "ExecReply",
    "ExecRequest",
    "KubeApiDouble",
    "RecordedRequest",
    "exec_status",
    "gpu_slice_devices",
    "slice_device",
]
