"""The CSI plugin's gRPC server: Identity and Node on the kubelet's unix socket.

Used by ``gpufleet cache node``::

    server = CsiServer("unix:///var/lib/kubelet/plugins/csi-gkm/csi.sock",
                       node=NodeServicer(...), ready=state.is_ready)
    await server.start()      # bound and serving; ConfigError (exit 2) for a bad endpoint
    ...
    await server.stop()       # in-flight calls get `grace` seconds; the socket file is removed

The endpoint is ``unix:///absolute/path`` (CSI's ``CSI_ENDPOINT`` form; ``unix:/path`` is read
the same). Its directory is created if missing; a stale socket left by a dead process is
removed; a live one (another plugin answers) or a file that is not a socket stops start-up. The
socket is created mode 0600 (the umask is narrowed while binding, so it is never wider): the
kubelet and csi-node-driver-registrar, the only clients, run as root. Hostile clients meet
bounds: 4 MiB per message (a real request is a few KiB), 16 KiB of metadata, 64 calls at once
(more get RESOURCE_EXHAUSTED), and grpc drops a connection that does not speak HTTP/2.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc.aio

from gpufleet.core.errors import ConfigError
from gpufleet.core.listen import add_grpc_port, prepare_socket, umask
from gpufleet.kcache.csi.identity import IdentityServicer
from gpufleet.kcache.csi.node import NodeServicer
from gpufleet.kcache.csi.v1 import csi_pb2_grpc
from gpufleet.kcache.errors import KcacheError

__all__ = [
    "MAX_CONCURRENT_RPCS",
    "MAX_MESSAGE_BYTES",
    "SOCKET_MODE",
    "CsiEndpointError",
    "CsiServer",
    "parse_endpoint",
]

_log = logging.getLogger(__name__)

SOCKET_MODE = 0o600
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024
MAX_CONCURRENT_RPCS = 64
_SETTING = "--csi-endpoint, CSI_ENDPOINT"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL


class CsiEndpointError(KcacheError, ConfigError):
    """The CSI endpoint is not a usable ``unix:///path``."""


def parse_endpoint(endpoint: str) -> Path:
    """The socket path of ``unix:///path`` (or ``unix:/path``); `CsiEndpointError` otherwise."""
    if not endpoint.startswith("unix:"):
        raise CsiEndpointError(
            f"{_SETTING}={endpoint!r}: must be unix:///absolute/path (CSI serves on a unix socket)"
        )
    rest = endpoint.removeprefix("unix:")
    path = rest.removeprefix("//") if rest.startswith("///") else rest
    if not path.startswith("/") or path.startswith("//"):
        raise CsiEndpointError(f"{_SETTING}={endpoint!r}: the socket path must be absolute")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise CsiEndpointError(
            f"{_SETTING}={endpoint!r}: a unix socket path holds at most {_SUN_PATH_MAX} bytes"
        )
    return Path(path)


class CsiServer:
    """Serves `IdentityServicer` and `node` on the unix socket of `endpoint`.

    `ready` answers Probe's ``ready`` (the node process: started and synced). Nothing binds
    before `start`; `stop` may be called once started, or never.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        node: NodeServicer,
        ready: Callable[[], bool],
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
    ) -> None:
        self.socket_path = parse_endpoint(endpoint)
        self._identity = IdentityServicer(ready)
        self._node = node
        self._max_message_bytes = max_message_bytes
        self._max_concurrent_rpcs = max_concurrent_rpcs
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Bind the socket (mode 0600) and serve; `ConfigError` subclasses if it cannot bind."""
        if self._server is not None:
            raise RuntimeError("CsiServer already started")
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.max_send_message_length", self._max_message_bytes),
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ],
            maximum_concurrent_rpcs=self._max_concurrent_rpcs,
        )
        # The generated _grpc module is untyped (see pyproject's mypy overrides).
        csi_pb2_grpc.add_IdentityServicer_to_server(self._identity, server)  # type: ignore[no-untyped-call]
        csi_pb2_grpc.add_NodeServicer_to_server(self._node, server)  # type: ignore[no-untyped-call]
        path = self.socket_path
        prepare_socket(
            path, setting=_SETTING, named=f"{_SETTING}: {path}", owner="plugin",
            error=CsiEndpointError,
        )  # fmt: skip
        with umask(0o177):
            add_grpc_port(server.add_insecure_port, f"unix:{path}", setting=_SETTING)
        os.chmod(path, SOCKET_MODE)
        await server.start()
        self._server = server
        _log.info("CSI plugin serving", extra={"socket": os.fspath(path)})

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving: in-flight calls get `grace` seconds; then remove the socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop(grace)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        _log.info("CSI plugin stopped", extra={"socket": os.fspath(self.socket_path)})
