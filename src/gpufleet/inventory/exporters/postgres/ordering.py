"""Overlapping PostgreSQL writes that commit in the order they were called.

The delivery pipeline sends an exporter with ``max_in_flight`` > 1 several
batches at once; each write takes a ``WriteTurn`` behind the write called
before it on the same ``WriteLine``, so the batches overlap their work but
not their effects. Pure asyncio: the exporter (``exporter.py``) does the SQL
and asks its turn when to run its statements and when to commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from gpufleet.inventory.reading import Reading

__all__ = ["TurnWriter", "WriteLine", "WriteTurn"]


class WriteTurn:
    """One write's place in a ``WriteLine``, behind the write called before it.

    Batches written at once overlap their work, not their effects: a batch
    runs its INSERT and upsert only once the batch ahead has run its own (so
    two batches never wait on each other's row locks in opposite directions,
    which no server could see as a deadlock), and commits only once the batch
    ahead has committed. When the batch ahead fails, this one commits nothing
    and raises ``EarlierWriteFailed``. Readings thus become visible batch by
    batch, in the order the writes were called, exactly as if they were sent
    one at a time.
    """

    __slots__ = ("_parts_left", "ahead", "outcome", "statements_done")

    def __init__(self, ahead: WriteTurn | None) -> None:
        # Only the turn ahead is referenced, and only until this one finishes,
        # so a line never keeps a chain of finished turns alive.
        self.ahead = ahead
        self.statements_done = asyncio.Event()
        self.outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._parts_left = 0

    def part(self) -> Callable[[], None]:
        """A callback for one part, to call once its statements have run (or it failed)."""
        self._parts_left += 1
        called = False

        def ready() -> None:
            nonlocal called
            if called:
                return
            called = True
            self._parts_left -= 1
            if self._parts_left == 0:
                self.statements_done.set()

        return ready

    async def ahead_ok(self) -> bool:
        """Wait until the batch ahead has committed or failed; ``True`` if committed (or none)."""
        if self.ahead is None:
            return True
        return await asyncio.shield(self.ahead.outcome)

    def ahead_known_ok(self) -> bool:
        """Whether the batch ahead is known to have committed (or there is none)."""
        ahead = self.ahead
        return ahead is None or (ahead.outcome.done() and ahead.outcome.result())

    def ahead_known_failed(self) -> bool:
        """Whether the batch ahead is known to have failed."""
        ahead = self.ahead
        return ahead is not None and ahead.outcome.done() and not ahead.outcome.result()

    def finish(self, committed: bool) -> None:
        """Record the outcome (the first call wins) and leave the line."""
        self.statements_done.set()
        if not self.outcome.done():
            self.outcome.set_result(committed)
        self.ahead = None


class TurnWriter(Protocol):
    """What a ``WriteLine`` writes through: ``PostgresExporter.write_in_turn``."""

    def write_in_turn(self, batch: Sequence[Reading], turn: WriteTurn) -> Coroutine[Any, Any, None]:
        """Write ``batch``, its statements and commit after those of ``turn.ahead``."""
        ...


class WriteLine:
    """Writes that commit in the order they were called, and stop at the first failure.

    Up to the exporter's ``max_in_flight`` calls may overlap. Once one write
    of the line has failed, every later write of the same line stores nothing
    and raises ``EarlierWriteFailed``, whenever it is called: a line never
    commits past a gap. Sending the batches again takes a new line.
    """

    def __init__(self, writer: TurnWriter) -> None:
        self._writer = writer
        self._last: WriteTurn | None = None

    def write(self, batch: Sequence[Reading]) -> Coroutine[Any, Any, None]:
        """Write the batch after the ones written before it on this line.

        The place in line is taken by the call itself, not when the returned
        coroutine first runs: the order of the calls is the order of the commits.
        """
        turn = self._last = WriteTurn(self._last)
        return self._writer.write_in_turn(batch, turn)
