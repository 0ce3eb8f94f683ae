"""One process at a time on a file: an exclusive ``flock`` held for the process's life.

A spool or a state file that two processes write at once loses data in silence,
so whoever opens one takes this lock first and a second process is refused at
once. The lock is the kernel's, on an open file description: it goes when the
process dies, even by SIGKILL, so a restart never finds a stale lock to clean up.
"""

from __future__ import annotations

import errno
import fcntl
from pathlib import Path
from types import TracebackType
from typing import IO

from gpufleet.core.errors import GpufleetError

__all__ = ["LockHeldError", "ProcessLock"]


class LockHeldError(GpufleetError):
    """Another process holds the lock; the caller says what that means for its file."""


class ProcessLock:
    """An exclusive, non-blocking ``flock`` on ``path`` (created, with its directory).

    Raises ``LockHeldError`` when another process holds it, and ``OSError``
    when the file cannot be created. Held until `release` (or the process ends).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(path, "a")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._file.close()
            self._file = None
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise LockHeldError(f"{path} is locked by another process") from None
            raise

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._file is None:
            return
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> ProcessLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
