"""The kernel cache's CSI node plugin (``csi.gkm.io``): inline ephemeral volumes, read-only.

The node process (``gpufleet cache node``) builds one and runs it beside its agent::

    from gpufleet.kcache.csi import CsiServer, NodeServicer
    from gpufleet.kcache.publications import PUBLICATIONS, PublicationLog

    node = NodeServicer(
        state,                                   # a cluster.VolumeSource
        kubelet_dir=Path("/var/lib/kubelet"),    # targets must lie under <kubelet_dir>/pods/
        node_id=node_name,                       # NodeGetInfo's node_id (NODE_NAME)
        publications=PublicationLog(store_root / PUBLICATIONS),
    )
    server = CsiServer(csi_endpoint, node=node, ready=state.is_ready)
    await server.start()
    ...
    await server.stop()

`NodeServicer` takes the mount functions (`gpufleet.kcache.mounts`) as keyword collaborators
too, for tests.

- `server`: the gRPC server on the kubelet's unix socket (bounds, endpoint parsing);
- `identity`: the Identity service (name, capabilities, readiness);
- `node`: the Node service, what each RPC checks and answers;
- `refusals`: the gRPC code and the log line of a refused request;
- `targets`: where the kubelet may ask us to mount;
- `attributes`: the volume context, read strictly;
- `v1`: the stubs generated from ``proto/csi/v1`` (``make proto``).

See docs/kcache-cluster.md, "CSI plugin".
"""

from gpufleet.kcache.csi.identity import IdentityServicer
from gpufleet.kcache.csi.node import NodeServicer
from gpufleet.kcache.csi.refusals import status_code
from gpufleet.kcache.csi.server import CsiEndpointError, CsiServer, parse_endpoint

__all__ = [
    "CsiEndpointError",
    "CsiServer",
    "IdentityServicer",
    "NodeServicer",
    "parse_endpoint",
    "status_code",
]
