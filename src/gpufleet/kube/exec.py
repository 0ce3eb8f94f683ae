"""Run a command in a container over the exec websocket, and get its exit code.

The API server's exec endpoint upgrades to a websocket speaking the
`v4.channel.k8s.io` protocol: every binary frame starts with one channel byte,
1 for stdout, 2 for stderr and 3 for a final `metav1.Status` in JSON. The
status says `Success`, or `Failure` with reason `NonZeroExitCode` and the code
in `details.causes[reason=ExitCode].message`, or `Failure` with a message when
the command could not be started at all (no such executable, say).

The command is an argv list handed to the container runtime as is. It is
never wrapped in a shell, so containers need no shell and nothing in the
arguments is ever interpreted (gpuid ran `/bin/sh -c "nvidia-smi -q -x"`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from gpufleet.kube.client import Kube
from gpufleet.kube.errors import ExecError, ExecTimeout

__all__ = ["MAX_OUTPUT_BYTES", "ExecResult", "exec_command"]

MAX_OUTPUT_BYTES = 16 * 1024 * 1024
"""Default cap on stdout + stderr; `nvidia-smi -q -x` on 8 GPUs is well under 1 MiB."""

_STDOUT, _STDERR, _STATUS = 1, 2, 3

_REFUSALS = {
    400: "bad request (container missing, or pod not running)",
    401: "unauthorized",
    403: "forbidden (RBAC needs create and get on pods/exec)",
    404: "pod not found",
}


@dataclass(frozen=True)
class _Target:
    namespace: str
    pod: str
    container: str

    def error(self, message: str, *, status: int | None = None) -> ExecError:
        return ExecError(
            message,
            namespace=self.namespace,
            pod=self.pod,
            container=self.container,
            status=status,
        )


@dataclass(frozen=True)
class ExecResult:
    """What a command in a container printed, and how it exited."""

    stdout: bytes
    stderr: bytes
    exit_code: int


async def exec_command(
    kube: Kube,
    namespace: str,
    pod: str,
    container: str,
    command: Sequence[str],
    *,
    timeout: float,  # noqa: ASYNC109 - it bounds the command, not the limiter's queue
    max_output: int = MAX_OUTPUT_BYTES,
) -> ExecResult:
    """Run `command` (an argv list, no shell) in a container and collect its output.

    A non-zero exit is not an error: it comes back as `exit_code`. Raises
    `ExecTimeout` when the command has not finished within `timeout` seconds
    (counted from the connection, not the rate limiter's queue), and
    `ExecError` when the API server refuses the exec (`status` is set: 404
    pod gone, 400 container missing, 403 forbidden), the command cannot be
    started, the output exceeds `max_output` bytes, or the stream breaks.
    """
    if isinstance(command, str | bytes):
        # A string is a Sequence[str] too, and would run as one letter per argument.
        raise TypeError("command must be a list of arguments, not a string")
    argv = list(command)
    if not argv or not all(isinstance(arg, str) for arg in argv):
        raise ValueError(f"command must be a non-empty list of strings, got {argv!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    where = _Target(namespace, pod, container)
    try:
        # This await is where the shared rate limiter may queue us; it opens
        # no connection yet, so the timeout below covers only the command.
        connection = await kube.ws_core.connect_get_namespaced_pod_exec(
            pod,
            namespace,
            container=container,
            command=argv,
            stdout=True,
            stderr=True,
            stdin=False,
            tty=False,
            _preload_content=False,
        )
    except ApiException as exc:
        raise where.error(f"API error: {exc.reason}", status=exc.status) from exc
    try:
        async with asyncio.timeout(timeout) as deadline:
            try:
                async with connection as ws:
                    return await _read(ws, max_output, where)
            except aiohttp.WSServerHandshakeError as exc:
                reason = _REFUSALS.get(exc.status, exc.message or "refused")
                raise where.error(
                    f"API server refused the exec: HTTP {exc.status} {reason}", status=exc.status
                ) from exc
            except aiohttp.ClientError as exc:
                raise where.error(f"connection failed: {exc}") from exc
    except TimeoutError as exc:
        if deadline.expired():
            raise ExecTimeout(
                timeout=timeout, namespace=namespace, pod=pod, container=container
            ) from exc
        raise where.error(f"connection timed out: {exc}") from exc


async def _read(ws: Any, max_output: int, where: _Target) -> ExecResult:
    stdout = bytearray()
    stderr = bytearray()
    status = bytearray()
    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            frame: bytes = message.data
        elif message.type == aiohttp.WSMsgType.TEXT:
            frame = message.data.encode("utf-8")
        elif message.type == aiohttp.WSMsgType.ERROR:
            raise where.error(f"websocket error: {ws.exception()}")
        else:
            continue
        # The server opens each channel with an empty frame; skip those.
        if len(frame) < 2:
            continue
        channel, payload = frame[0], frame[1:]
        if channel == _STDOUT:
            stdout += payload
        elif channel == _STDERR:
            stderr += payload
        elif channel == _STATUS:
            status += payload
            exit_code = _exit_code(bytes(status), where)
            if exit_code is not None:
                return ExecResult(bytes(stdout), bytes(stderr), exit_code)
        if len(stdout) + len(stderr) > max_output:
            raise where.error(f"output exceeds {max_output} bytes")
    raise where.error("stream closed without an exit status (container or connection gone?)")


def _exit_code(raw: bytes, where: _Target) -> int | None:
    """The exit code a channel-3 status reports; None while the JSON is still incomplete."""
    try:
        status = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(status, dict):
        raise where.error(f"unreadable exec status {raw[:200]!r}")
    if status.get("status") == "Success":
        return 0
    if status.get("reason") == "NonZeroExitCode":
        details = status.get("details") or {}
        for cause in details.get("causes") or ():
            # metav1.StatusCause serialises its type as `reason`; accept `type` too.
            kind = cause.get("reason") or cause.get("type")
            if kind == "ExitCode":
                try:
                    return int(cause.get("message", ""))
                except ValueError:
                    break
        raise where.error(f"non-zero exit without a readable exit code: {status}")
    message = status.get("message") or status.get("reason") or "exec failed"
    raise where.error(str(message))
