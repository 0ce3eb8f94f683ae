"""One measured phase of the device API bench: latencies, rates, and whether it kept up."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from _device_api_watchers import Collected
from _device_api_writer import Writes

SUSTAINED = 0.95  # fraction of the offered write and event rates that counts as keeping up


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Phase:
    """One write phase, measured."""

    label: str
    offered: float | None  # updates/s asked for (open loop)
    writes: Writes
    seen: Collected
    watchers: int
    server: tuple[float, float, float]  # server events, messages, evictions in the phase
    cpu: dict[str, float]  # CPU seconds used in the phase: server, watchers, writer, others
    latencies: list[float] = field(init=False)  # ms, update -> the last watcher
    delivered: int = field(init=False)  # events the watchers received
    span: float = field(init=False)  # first send (or scheduled time) -> last arrival

    def __post_init__(self) -> None:
        sent, arrivals = self.writes.sent, self.seen.arrivals
        self.latencies = [
            (arrivals[rv][1] - t) * 1e3
            for rv, t in sent.items()
            if rv in arrivals and arrivals[rv][0] >= self.watchers
        ]
        self.delivered = sum(int(arrivals[rv][0]) for rv in sent if rv in arrivals)
        drained = max((arrivals[rv][1] for rv in sent if rv in arrivals), default=0.0)
        self.span = max(drained, self.writes.end) - self.writes.start

    @property
    def write_rate(self) -> float:
        return len(self.writes.sent) / max(self.writes.end - self.writes.start, 1e-9)

    @property
    def delivered_rate(self) -> float:
        return self.delivered / self.span if self.span > 0 else 0.0

    @property
    def clean(self) -> bool:
        """No eviction, relist, write error, or write missing at any watcher."""
        seen = self.seen
        return (
            self.server[2] == 0
            and seen.relists == seen.evictions == seen.expirations == seen.behind == 0
            and self.writes.errors == 0
            and len(self.latencies) == len(self.writes.sent) > 0
        )

    @property
    def sustained(self) -> bool:
        if self.offered is None:
            return self.clean
        return (
            self.clean
            and self.writes.cap_hits == 0
            and self.write_rate >= SUSTAINED * self.offered
            and self.delivered_rate >= SUSTAINED * self.offered * self.watchers
        )

    def print(self) -> None:
        w, s = self.writes, self.seen
        head = f"{self.label}: wrote {len(w.sent):,} at {self.write_rate:,.0f}/s"
        if self.offered is not None:
            head += f" (offered {self.offered:,.0f}/s; peak {w.peak} in flight, "
            head += f"cap hit {w.cap_hits} times)"
        print(head)
        events, messages, evicted = self.server
        line = f"  delivered {self.delivered_rate:,.0f} events/s over {self.span:.2f} s"
        if self.span > 0:
            line += f"; server sent {events / self.span:,.0f} events/s in "
            line += f"{messages / self.span:,.0f} messages/s"
        if messages:
            line += f" ({events / messages:.1f} events/message)"
        print(line)
        wall = max(self.span, 1e-9)
        busy = ", ".join(f"{k} {v / wall:.0%}" for k, v in self.cpu.items())
        print(f"  CPU (100% = one core): {busy}")
        if self.latencies:
            lat = self.latencies
            kind = "scheduled time" if self.offered is not None else "send"
            print(f"  update ({kind}) -> all {self.watchers} watchers: "
                  f"p50 {statistics.median(lat):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, "
                  f"max {max(lat):.1f} ms")  # fmt: skip
        print(f"  {len(self.latencies):,}/{len(w.sent):,} writes reached every watcher; "
              f"{w.errors} write errors; {evicted:.0f} evictions (server), "
              f"{s.evictions} evictions, {s.relists} relists, {s.expirations} expirations, "
              f"{s.behind} informers behind (watchers)")  # fmt: skip
        for kind, n in w.error_kinds.items():
            print(f"  write error x{n}: {kind}")
        if self.offered is not None:
            print(f"  {'sustained' if self.sustained else 'NOT sustained'}", flush=True)
