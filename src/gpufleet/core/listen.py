"""Turn a failed bind into one `ListenError` line that names the setting and the address.

Every long-running command listens somewhere: the aiohttp server of /metrics,
/healthz and /readyz (`gpufleet.core.http.HealthServer`), gRPC on a TCP port or
a unix socket. A port that is taken, an address that is not this machine's, or
a socket path whose directory cannot exist is the user's configuration, so it
must end the process with exit status 2 and one line such as::

    cannot listen on 0.0.0.0:8081 (--metrics-port, METRICS_PORT): address already in use

gRPC reports a failed bind only as "Failed to bind to address" (and logs its
own line from C), so `add_grpc_port` first binds a plain socket to the same
address to learn the reason the way the kernel says it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from gpufleet.core.errors import ListenError

__all__ = [
    "add_grpc_port",
    "ensure_socket_directory",
    "format_address",
    "listen_error",
    "prepare_socket",
    "umask",
]


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(error: OSError) -> str:
    # asyncio wraps the errno in its own long sentence; the errno says it shortest.
    if isinstance(error.errno, int) and error.errno > 0:
        text = os.strerror(error.errno)
    else:
        text = error.strerror or str(error) or type(error).__name__
    # "Address already in use" reads as part of our sentence; "AF_UNIX ..." keeps its case.
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def listen_error(setting: str, address: str, error: OSError) -> ListenError:
    """The `ListenError` for ``error``, raised binding ``address`` as configured by ``setting``.

    ``setting`` names the flag and the variable the address came from, as the
    user spells them (``--metrics-port, METRICS_PORT``).
    """
    return ListenError(f"cannot listen on {address} ({setting}): {_reason(error)}")


def ensure_socket_directory(path: Path, *, setting: str) -> None:
    """Create the directory of the unix socket ``path``; `ListenError` if it cannot be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {path} ({setting}): cannot create its directory {path.parent}: "
            f"{_reason(exc)}"
        ) from exc
    if not path.parent.is_dir():
        # mkdir(exist_ok=True) accepts a dangling symlink or a file named like the
        # directory on some systems; bind would fail later with a vaguer reason.
        raise ListenError(f"cannot listen on {path} ({setting}): {path.parent} is not a directory")


def _socket_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def prepare_socket(
    path: Path, *, setting: str, named: str, owner: str, error: Callable[[str], Exception]
) -> None:
    """Create the socket's directory and remove a stale socket left by a dead ``owner``.

    A file there that is not a socket, or a socket something still answers on, is left
    alone and raised as ``error(f"{named} exists and is not a socket")`` or
    ``error(f"{named} is in use by a running {owner}")``.
    """
    ensure_socket_directory(path, setting=setting)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise error(f"{named} exists and is not a socket")
    if _socket_in_use(path):
        raise error(f"{named} is in use by a running {owner}")
    path.unlink()


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Bind under this umask: a socket must never exist with wider permissions, even briefly."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _probe_unix(path: str) -> None:
    if Path(path).exists():
        # A stale socket is the caller's to remove; binding over it would fail here.
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(path)
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()


def _probe_tcp(host: str, port: int) -> None:
    # gRPC binds every address the name resolves to and succeeds if one binds,
    # so the probe fails only when none does (`localhost` on a host without IPv6).
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    first: OSError | None = None
    for family, kind, proto, _name, address in infos:
        probe = socket.socket(family, kind, proto)
        try:
            # As servers do: a port left in TIME_WAIT by the last run is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
        except OSError as exc:
            first = first or exc
        else:
            return
        finally:
            probe.close()
    if first is not None:
        raise first


def _split_target(target: str) -> tuple[str, int] | None:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def add_grpc_port(add_port: Callable[[str], int], target: str, *, setting: str) -> int:
    """Call ``add_port(target)`` (a gRPC server's ``add_*_port``); `ListenError` if it fails.

    ``target`` is ``unix:PATH`` or ``HOST:PORT``. Returns the bound port, as
    ``add_port`` does.
    """
    shown = target.removeprefix("unix:")
    try:
        if target.startswith("unix:"):
            _probe_unix(shown)
        else:
            split = _split_target(target)
            if split is not None:
                _probe_tcp(*split)
    except OSError as exc:
        raise listen_error(setting, shown, exc) from exc
    try:
        return add_port(target)
    except RuntimeError as exc:
        # Bound by someone else between the probe and now, or refused for a
        # reason a plain socket does not meet: gRPC's C core logged why.
        raise ListenError(f"cannot listen on {shown} ({setting}): gRPC could not bind it") from exc
