"""A hostile HTTP/1.1 server: leads a client where it must not go, and records what it got.

`HostileServer` runs in a thread on a real loopback socket (TLS if given a
context); its handler answers each request with a `Reply`, whole or chunked, and
every request it received is kept in `seen`, so a test asserts on what a peer
really received; `sent` counts the body bytes the socket took. The
`hostile_servers` fixture (tests/conftest.py) starts them and closes them after
the test; `in_thread` runs the blocking client against them under a hang guard.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = [
    "HANG_GUARD_S",
    "HUGE",
    "SOCKET_SLACK",
    "Handler",
    "HostileServer",
    "Reply",
    "Seen",
    "in_thread",
]

HANG_GUARD_S = 60.0
HUGE = 256 * 1024 * 1024  # what the hostile server offers; the client must stop long before
SOCKET_SLACK = 48 * 1024 * 1024  # loopback socket buffers the server may fill before blocking


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    target: str  # path with query
    headers: dict[str, str]  # names lower-cased
    body: bytes


class Reply:
    """How a handler answers: a status, headers and a body given whole or as chunks."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str] | None = None,
        body: bytes | Iterable[bytes] = b"",
    ) -> None:
        self.status = status
        self.headers = headers or {}
        self.body = body


Handler = Callable[[Seen], Reply]


@dataclass
class HostileServer:
    """An HTTP/1.1 server in a thread on 127.0.0.1; `handler` answers each request.

    Bodies given as an iterable go out chunked, one chunk at a time; `sent`
    counts the body bytes the socket accepted, so a client that stops reading
    shows up as a count far below what the handler offered.
    """

    handler: Handler
    tls: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    sent: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)  # so the accept loop sees `close` soon
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, as a registry name."""
        return f"127.0.0.1:{self.port}"

    def url(self, path: str, scheme: str | None = None) -> str:
        """The URL of `path` on this server (https when it has TLS, unless `scheme` says)."""
        return f"{scheme or ('https' if self.tls else 'http')}://{self.address}{path}"

    def close(self) -> None:
        """Stop accepting and wait for the accept loop to end."""
        self._stop.set()
        self._listener.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            stream = conn.makefile("rb")
            while not self._stop.is_set():
                seen = _read_request(stream)
                if seen is None:
                    return
                self.seen.append(seen)
                if not self._answer(conn, seen, self.handler(seen)):
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()

    def _answer(self, conn: socket.socket, seen: Seen, reply: Reply) -> bool:
        head = [f"HTTP/1.1 {reply.status} X"]
        head += [f"{name}: {value}" for name, value in reply.headers.items()]
        whole = isinstance(reply.body, bytes)
        if whole:
            assert isinstance(reply.body, bytes)
            head.append(f"Content-Length: {len(reply.body)}")
        else:
            head.append("Transfer-Encoding: chunked")
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if seen.method == "HEAD":
            return True
        try:
            if isinstance(reply.body, bytes):
                conn.sendall(reply.body)
                self.sent += len(reply.body)
                return True
            for chunk in reply.body:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.sent += len(chunk)
            conn.sendall(b"0\r\n\r\n")
        except OSError:
            return False  # the client hung up: what it read is what `sent` says, or less
        return True


def _read_request(stream: object) -> Seen | None:
    readline = stream.readline  # type: ignore[attr-defined]
    read = stream.read  # type: ignore[attr-defined]
    line = readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (header := readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while size := int(readline().split(b";")[0], 16):
            parts.append(read(size))
            readline()
        readline()
        body = b"".join(parts)
    return Seen(method, target, headers, body)


def in_thread(work: Callable[[], object]) -> BaseException | None:
    """Run `work` under a hang guard; the exception it raised, or None."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert outcome, f"the client was still busy after the {HANG_GUARD_S} s hang guard"
    return outcome[0]
