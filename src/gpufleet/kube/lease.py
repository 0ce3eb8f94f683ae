"""Leader election on a `coordination.k8s.io/v1` Lease.

One replica holds the Lease and renews it every `retry_period`; the others
watch it and take over once it has gone unrenewed for `lease_duration`. The
rules are client-go's (`tools/leaderelection`), written out here rather than
using `kubernetes_asyncio.leaderelection`, because that one keeps leading
while a renewal hangs (its requests have no deadline) and keeps retrying
after another candidate has taken the lease; we need the leader to stop
**at once** in both cases, before anyone else can start:

- A leader stops leading the moment `renew_deadline` has passed since the
  start of its last successful renewal (each attempt is cut off there), or
  as soon as it reads the Lease held by someone else, or its write loses an
  optimistic-concurrency race (409) to a new holder.
- A candidate takes the Lease when it is free (no holder: released), when it
  holds it itself already, or when it has **seen** the same record unrenewed
  for the record's `leaseDurationSeconds` on its own monotonic clock. That is
  `renewTime + leaseDurationSeconds < now` with "renewTime" measured as
  the moment this process saw that renewTime, so skew between machines' wall
  clocks can never make two leaders.

Because `renew_deadline < lease_duration`, the old leader has stopped before
any candidate can consider the Lease expired. Every write carries the
resourceVersion it read, so two candidates racing for one Lease cannot both win.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from gpufleet.kube.client import Kube, api_status, call_json
from gpufleet.kube.errors import LeaseLost
from gpufleet.kube.settings import LeaseSettings

__all__ = ["LeaderElector", "LeaseSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Record:
    """The part of a Lease that says who leads; compared to notice renewals."""

    holder: str
    duration: int | None
    acquire_time: str | None
    renew_time: str | None
    transitions: int

    @classmethod
    def of(cls, lease: dict[str, Any]) -> _Record:
        spec = lease.get("spec") or {}
        duration = spec.get("leaseDurationSeconds")
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=duration if isinstance(duration, int) and duration > 0 else None,
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )


def _micro_time(moment: datetime) -> str:
    """A `metav1.MicroTime` as the API server writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Compete for one Lease; lead while holding it (see the module notes for the rules).

    `run()` competes until `stop()` or cancellation: it acquires, renews,
    and after losing the Lease competes again, unless `raise_on_loss` is set,
    in which case it raises `LeaseLost` (gpuid's behaviour: the process exits
    and its replacement competes afresh). On stopping it releases a Lease it
    holds, so another replica takes over within a retry period instead of a
    lease duration.

    `is_leader` and the events `leading` / `not_leading` tell the state;
    `on_started_leading` and `on_stopped_leading` run at each transition.
    They are plain functions because leadership must change at once: start
    or cancel work from them, don't await it there.
    """

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        raise_on_loss: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not identity:
            raise ValueError("identity must not be empty")
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError(
                "need lease_duration > renew_deadline > retry_period > 0, got "
                f"{lease_duration:g} / {renew_deadline:g} / {retry_period:g}"
            )
        self._kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._raise_on_loss = raise_on_loss
        self._clock = clock
        self._wall_clock = wall_clock

        self.leading = asyncio.Event()
        """Set while this replica leads."""
        self.not_leading = asyncio.Event()
        """Set while this replica does not lead (the complement of `leading`)."""
        self.not_leading.set()
        self._stop = asyncio.Event()
        self._observed: _Record | None = None
        self._observed_at = 0.0
        self._lease: dict[str, Any] | None = None  # the last Lease read or written
        self._renewal_started = 0.0  # local time the current attempt began
        self._reached = False  # whether the last attempt got an answer from the server
        self._running = False

    @classmethod
    def from_settings(cls, kube: Kube, settings: LeaseSettings, **options: Any) -> LeaderElector:
        """An elector configured from `LeaseSettings` (`options` go to the constructor)."""
        return cls(
            kube,
            namespace=settings.lease_namespace,
            name=settings.lease_name,
            identity=settings.identity,
            lease_duration=settings.lease_duration,
            renew_deadline=settings.lease_renew_deadline,
            retry_period=settings.lease_retry_period,
            **options,
        )

    @property
    def is_leader(self) -> bool:
        """Whether this replica leads right now."""
        return self.leading.is_set()

    @property
    def healthy(self) -> bool:
        """Whether the last acquire or renew attempt got an answer from the API server.

        A leader, or a standby that can read the Lease, can take over when
        needed; for readiness checks. False before the first attempt.
        """
        return self._reached

    @property
    def holder(self) -> str | None:
        """The holder identity last read from the Lease (None before the first read)."""
        return self._observed.holder if self._observed is not None else None

    async def run(self) -> None:
        """Compete for the Lease and lead while holding it, until `stop()` or cancellation.

        An elector is good for one run: once `stop()` has been called (even
        before `run()` started, a shutdown race), `run()` returns at once.
        """
        if self._running:
            raise RuntimeError("this elector is already running")
        self._running = True
        try:
            while not self._stop.is_set():
                if not await self._acquire():
                    return
                reason = await self._renew_until_lost()
                if reason is None:
                    return
                self._stop_leading(reason)
                if self._raise_on_loss:
                    raise LeaseLost(self.namespace, self.name, self.identity, reason)
        finally:
            self._running = False
            await self.release()

    async def stop(self) -> None:
        """Stop competing; a running `run()` releases the Lease if held, and returns."""
        self._stop.set()

    async def release(self) -> None:
        """Stop leading and hand the Lease back (no holder), so a successor need not wait.

        `run()` does this itself when it ends; calling it again is harmless.
        Failure to release is logged, not raised: the Lease then just expires.
        """
        if self.is_leader:
            self._stop_leading("stopped")
        await self._release()

    # Candidate --------------------------------------------------------------

    async def _acquire(self) -> bool:
        """Wait until this replica leads (True), or until stopped (False)."""
        while not self._stop.is_set():
            if await self._attempt(self.renew_deadline):
                self._start_leading()
                return True
            if await self._pause(self.retry_period):
                return False
        return False

    # Leader -----------------------------------------------------------------

    async def _renew_until_lost(self) -> str | None:
        """Renew until leadership is lost (the reason) or the elector is stopped (None)."""
        last_renewal = self._renewal_started
        while True:
            deadline = last_renewal + self.renew_deadline
            if await self._pause(min(self.retry_period, max(0.0, deadline - self._clock()))):
                return None
            remaining = deadline - self._clock()
            if remaining <= 0:
                return f"could not renew within {self.renew_deadline:g}s"
            if await self._attempt(remaining):
                last_renewal = self._renewal_started
                continue
            if self._clock() >= deadline:
                return f"could not renew within {self.renew_deadline:g}s"
            if self._observed is not None and self._observed.holder != self.identity:
                return f"lease taken by {self._observed.holder or 'nobody (released)'}"

    # One try ------------------------------------------------------------------

    async def _attempt(self, limit: float) -> bool:
        """One acquire-or-renew, cut off after `limit` seconds; True when we hold the Lease."""
        self._renewal_started = self._clock()
        try:
            async with asyncio.timeout(limit):
                held = await self._try_acquire_or_renew()
            self._reached = True
            return held
        except TimeoutError:
            log.warning(
                "lease request timed out",
                extra={"lease": f"{self.namespace}/{self.name}", "after_s": round(limit, 3)},
            )
        except Exception as exc:
            # Any failure is one lost attempt; the deadline decides what it costs.
            log.warning(
                "lease request failed",
                extra={
                    "lease": f"{self.namespace}/{self.name}",
                    "error": f"{type(exc).__name__}: {exc}",
                    "status": api_status(exc),
                },
            )
        self._reached = False
        return False

    async def _try_acquire_or_renew(self) -> bool:
        coordination = self._kube.coordination
        started = self._renewal_started
        now = _micro_time(self._wall_clock())
        try:
            lease = await call_json(coordination.read_namespaced_lease, self.name, self.namespace)
        except ApiException as exc:
            if api_status(exc) != 404:
                raise
            return await self._create(now)
        record = _Record.of(lease)
        if record != self._observed:
            self._observed, self._observed_at = record, started
        self._lease = lease
        if record.holder and record.holder != self.identity and not self._expired(started):
            return False
        spec = dict(lease.get("spec") or {})
        if record.holder != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = (
                record.transitions + 1 if record.holder else record.transitions
            )
        spec["holderIdentity"] = self.identity
        spec["leaseDurationSeconds"] = self._duration_seconds()
        spec["renewTime"] = now
        # metadata.resourceVersion travels with the body: a stale write is a 409.
        body = {**lease, "spec": spec}
        try:
            written = await call_json(
                coordination.replace_namespaced_lease, self.name, self.namespace, body
            )
        except ApiException as exc:
            if api_status(exc) == 409:
                return False  # someone wrote the Lease since we read it: they won
            raise
        self._lease = written
        self._observed, self._observed_at = _Record.of(written), started
        return True

    async def _create(self, now: str) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self._duration_seconds(),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            written = await call_json(
                self._kube.coordination.create_namespaced_lease, self.namespace, body
            )
        except ApiException as exc:
            if api_status(exc) == 409:
                return False  # another candidate created it first
            raise
        self._lease = written
        self._observed, self._observed_at = _Record.of(written), self._renewal_started
        return True

    async def _release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is None or _Record.of(lease).holder != self.identity:
            return
        spec = dict(lease.get("spec") or {})
        spec["holderIdentity"] = None
        spec["leaseDurationSeconds"] = 1
        spec["renewTime"] = _micro_time(self._wall_clock())
        try:
            async with asyncio.timeout(self.retry_period):
                await call_json(
                    self._kube.coordination.replace_namespaced_lease,
                    self.name,
                    self.namespace,
                    {**lease, "spec": spec},
                )
        except Exception as exc:
            # Not fatal: the Lease simply expires after its duration instead.
            log.warning(
                "could not release the lease",
                extra={
                    "lease": f"{self.namespace}/{self.name}",
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
        else:
            log.info("released the lease", extra={"lease": f"{self.namespace}/{self.name}"})

    # Helpers --------------------------------------------------------------------

    def _expired(self, now: float) -> bool:
        observed = self._observed
        if observed is None:
            return False
        duration = observed.duration if observed.duration is not None else self.lease_duration
        return self._observed_at + duration < now

    def _duration_seconds(self) -> int:
        # The API stores whole seconds; round up so nobody expires us early.
        return max(1, math.ceil(self.lease_duration))

    async def _pause(self, seconds: float) -> bool:
        """Sleep `seconds`, or less if stopped; True when stopped."""
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self._stop.wait()
            except TimeoutError:
                pass
        return self._stop.is_set()

    def _start_leading(self) -> None:
        self.not_leading.clear()
        self.leading.set()
        log.info(
            "started leading",
            extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity},
        )
        self._notify(self._on_started, "on_started_leading")

    def _stop_leading(self, reason: str) -> None:
        self.leading.clear()
        self.not_leading.set()
        log.warning(
            "stopped leading",
            extra={
                "lease": f"{self.namespace}/{self.name}",
                "identity": self.identity,
                "reason": reason,
            },
        )
        self._notify(self._on_stopped, "on_stopped_leading")

    def _notify(self, callback: Callable[[], None] | None, label: str) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception as exc:
            log.error(
                "leader election callback failed",
                extra={"callback": label, "error": f"{type(exc).__name__}: {exc}"},
                exc_info=exc,
            )
