"""Pod exec: the request and reply types, the default handler, and the channel protocol.

The API server answers exec over a websocket with subprotocol
``v4.channel.k8s.io``: each binary frame starts with a channel byte (1 stdout,
2 stderr, 3 error), and the last frame on channel 3 is a ``metav1.Status``
carrying the exit code. The default handler plays a device-plugin container on
a simulated GPU node: ``nvidia-smi -q -x`` prints the node's simulated GPUs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.smi import smi_stderr_lines, write_smi_xml
from gpufleet.gpu.snapshot import take_snapshot
from tests.doubles.kubeapi._objects import JsonObject, stable_seed

_log = logging.getLogger(__name__)

PROTOCOL = "v4.channel.k8s.io"
STDOUT, STDERR, ERROR = 1, 2, 3
_FRAME_BYTES = 32 * 1024
"""The kubelet streams output in buffers; long output arrives in several frames."""

DEFAULT_PRESET = "dgx-h100"


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """One exec call, as the double's exec handler receives it."""

    namespace: str
    pod: str
    container: str
    command: list[str]
    node_name: str
    pod_uid: str


@dataclass(frozen=True, slots=True)
class ExecReply:
    """What the command printed and how it ended.

    ``delay`` seconds pass, with the websocket open and silent, before any
    output: a hanging command, for timeout tests.
    """

    stdout: bytes
    stderr: bytes = b""
    exit_code: int = 0
    delay: float = 0.0


ExecHandler = Callable[[ExecRequest], Awaitable[ExecReply]]


def exec_status(exit_code: int, command: list[str]) -> JsonObject:
    """The channel-3 ``metav1.Status`` for a command that exited with ``exit_code``.

    The exit code travels in ``details.causes[0]``; ``StatusCause.Type`` is
    serialized as ``reason`` on the wire (``{"reason": "ExitCode", "message": "3"}``).
    """
    if exit_code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": (
            f"command terminated with non-zero exit code: error executing command "
            f"{command}, exit code {exit_code}"
        ),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
    }


class SmiRenderer:
    """``nvidia-smi -q -x`` output per node, rendered once per node and fleet.

    A render costs 2-4 ms of CPU on the event loop (NVML calls through the
    simulator, then XML), so each node's document is cached until its fleet is
    set again; benchmarks can pay for every node up front with ``prerender``.
    Mutating a ``SimFleet`` after ``set_fleet`` does not reach the cache: call
    ``set_fleet`` again.
    """

    def __init__(self) -> None:
        self._fleets: dict[str, sim.SimFleet] = {}
        self._cache: dict[str, tuple[bytes, bytes]] = {}

    def set_fleet(self, node_name: str, fleet: sim.SimFleet | str) -> None:
        """The GPUs of ``node_name``: a ``SimFleet``, or a preset name seeded by the node name."""
        if isinstance(fleet, str):
            fleet = sim.preset(fleet, seed=stable_seed(node_name))
        self._fleets[node_name] = fleet
        self._cache.pop(node_name, None)

    def fleet(self, node_name: str) -> sim.SimFleet:
        """The node's fleet; a node never set gets a ``dgx-h100`` of its own."""
        if node_name not in self._fleets:
            self._fleets[node_name] = sim.preset(DEFAULT_PRESET, seed=stable_seed(node_name))
        return self._fleets[node_name]

    def render(self, node_name: str) -> tuple[bytes, bytes]:
        """(stdout, stderr) of ``nvidia-smi -q -x`` on ``node_name``."""
        cached = self._cache.get(node_name)
        if cached is None:
            # Rendered on the loop: a worker thread only adds GIL contention.
            cached = self._cache[node_name] = _render(self.fleet(node_name))
        return cached

    async def prerender(self, node_names: Iterable[str]) -> None:
        """Render ``node_names`` now, yielding to the loop between nodes."""
        for node_name in node_names:
            self.render(node_name)
            await asyncio.sleep(0)


def _render(fleet: sim.SimFleet) -> tuple[bytes, bytes]:
    with NvmlSource(sim.open(fleet)) as source:
        snap = take_snapshot(source)
    stdout = write_smi_xml(snap.devices, snap.samples, snap.processes).encode()
    stderr = "".join(f"{line}\n" for line in smi_stderr_lines(snap.devices)).encode()
    return stdout, stderr


def default_handler(renderer: SmiRenderer) -> ExecHandler:
    """An exec handler that knows ``nvidia-smi -q -x`` and nothing else."""

    async def handle(request: ExecRequest) -> ExecReply:
        command = request.command
        if command and command[0] == "nvidia-smi":
            if sorted(command[1:]) in (["-q", "-x"], ["--query", "--xml-format"]):
                stdout, stderr = renderer.render(request.node_name)
                return ExecReply(stdout, stderr)
            return ExecReply(
                b"",
                b"Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n",
                exit_code=2,
            )
        name = command[0] if command else ""
        return ExecReply(b"", f"sh: 1: {name}: not found\n".encode(), exit_code=127)

    return handle


async def serve_exec(
    raw_request: web.BaseRequest,
    request: ExecRequest,
    handler: ExecHandler,
    stopping: asyncio.Event,
) -> web.WebSocketResponse:
    """Upgrade to the channel protocol, run ``handler``, stream its reply, close."""
    ws = web.WebSocketResponse(protocols=(PROTOCOL,))
    await ws.prepare(raw_request)
    try:
        try:
            reply = await handler(request)
        except Exception as exc:  # a broken test handler must still answer the client
            _log.exception("exec handler failed", extra={"pod": request.pod})
            status = {
                "metadata": {},
                "status": "Failure",
                "reason": "InternalError",
                "message": f"exec handler failed: {exc!r}",
            }
            await ws.send_bytes(bytes([ERROR]) + json.dumps(status).encode())
            return ws
        if reply.delay > 0:
            stop = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait({stop}, timeout=reply.delay)
            finally:
                stop.cancel()
            if stopping.is_set():
                return ws
        for channel, data in ((STDOUT, reply.stdout), (STDERR, reply.stderr)):
            for start in range(0, len(data), _FRAME_BYTES):
                await ws.send_bytes(bytes([channel]) + data[start : start + _FRAME_BYTES])
        status = exec_status(reply.exit_code, request.command)
        await ws.send_bytes(bytes([ERROR]) + json.dumps(status).encode())
    except ConnectionError:
        pass  # the client went away: nothing to tell it
    finally:
        await ws.close()
    return ws


def exec_target(pod: JsonObject, params: Mapping[str, str]) -> str:
    """The container an exec addresses, defaulted as the server defaults it (one container)."""
    names: list[str] = [str(c["name"]) for c in pod.get("spec", {}).get("containers", [])]
    container = str(params.get("container", ""))
    if not container:
        if len(names) == 1:
            return names[0]
        raise ValueError(
            f"a container name must be specified for pod {pod['metadata']['name']}, "
            f"choose one of: {names}"
        )
    if container not in names:
        raise ValueError(f"container {container} is not valid for pod {pod['metadata']['name']}")
    return container
