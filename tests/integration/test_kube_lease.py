"""Leader election on a Lease in the API double, with short durations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpufleet.kube.client import Kube, call_json
from gpufleet.kube.errors import LeaseLost
from gpufleet.kube.lease import LeaderElector
from gpufleet.kube.ratelimit import TokenBucket
from tests.doubles.kubeapi import KubeApiDouble
from tests.polling import eventually

pytestmark = pytest.mark.integration

NS = "gpuid"
LEASE = "gpuid-leader"
DURATION, DEADLINE, RETRY = 1.0, 0.6, 0.2
HANG_GUARD_S = 30.0
"""Fails only what never happens; the properties are stated by clocks and events."""


def frozen() -> float:
    """A local clock that never moves: no Lease ever goes unrenewed for long enough."""
    return 0.0


class ManualClock:
    """A local clock that moves only when the test sets it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lease_reads(api: KubeApiDouble) -> int:
    """How many times anyone has read the Lease."""
    return api.count(verb="get", resource="leases")


@pytest.fixture
async def api() -> AsyncIterator[KubeApiDouble]:
    async with KubeApiDouble() as double:
        yield double


class Running:
    """Electors running as tasks, stopped and awaited at the end of a test."""

    def __init__(self) -> None:
        self.tasks: dict[LeaderElector, asyncio.Task[None]] = {}

    def start(self, kube: Kube, identity: str, **options: Any) -> LeaderElector:
        elector = LeaderElector(
            kube,
            namespace=NS,
            name=LEASE,
            identity=identity,
            lease_duration=DURATION,
            renew_deadline=DEADLINE,
            retry_period=RETRY,
            **options,
        )
        self.tasks[elector] = asyncio.create_task(elector.run())
        return elector

    async def stop(self, elector: LeaderElector) -> None:
        await elector.stop()
        await self.tasks.pop(elector)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    electors = Running()
    yield electors
    for elector, task in electors.tasks.items():
        await elector.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def first_leader(*electors: LeaderElector, within: float) -> LeaderElector:
    waits = {asyncio.create_task(e.leading.wait()): e for e in electors}
    done, pending = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    assert done, "nobody became leader"
    return waits[done.pop()]


async def test_one_of_two_electors_leads(api: KubeApiDouble, kube: Kube, running: Running) -> None:
    starts: list[str] = []
    one = running.start(kube, "replica-1", on_started_leading=lambda: starts.append("replica-1"))
    two = running.start(kube, "replica-2", on_started_leading=lambda: starts.append("replica-2"))

    leader = await first_leader(one, two, within=HANG_GUARD_S)
    await asyncio.sleep(2 * DURATION)  # several renewals and failed takeovers

    assert starts == [leader.identity]
    assert [one.is_leader, two.is_leader].count(True) == 1
    lease = api.get("leases", NS, LEASE)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == leader.identity


async def test_the_other_takes_over_when_the_leader_stops(kube: Kube, running: Running) -> None:
    # On frozen clocks no Lease ever expires: the follower can only take the
    # one the leader hands back, so it need not wait out a lease duration.
    one = running.start(kube, "replica-1", clock=frozen)
    two = running.start(kube, "replica-2", clock=frozen)
    leader = await first_leader(one, two, within=HANG_GUARD_S)
    follower = two if leader is one else one

    await running.stop(leader)
    await asyncio.wait_for(follower.leading.wait(), timeout=HANG_GUARD_S)

    assert not leader.is_leader


async def test_a_dead_leaders_lease_is_taken_once_it_expires(
    api: KubeApiDouble, kube: Kube, running: Running
) -> None:
    # A leader that vanished without releasing: its Lease is simply not renewed.
    await call_json(
        kube.coordination.create_namespaced_lease,
        NS,
        {
            "metadata": {"name": LEASE, "namespace": NS},
            "spec": {
                "holderIdentity": "crashed-replica",
                "leaseDurationSeconds": 1,
                "renewTime": "2026-01-01T00:00:00.000000Z",
            },
        },
    )
    clock = ManualClock()
    candidate = running.start(kube, "replica-1", clock=clock)

    # Not before the record has gone unrenewed for its duration, as seen locally:
    # at exactly its duration the candidate reads the Lease again and leaves it.
    await eventually(lambda: lease_reads(api) >= 2, limit=HANG_GUARD_S)
    clock.now = DURATION
    reads = lease_reads(api)
    await eventually(lambda: lease_reads(api) >= reads + 2, limit=HANG_GUARD_S)
    assert not candidate.is_leader
    clock.now = DURATION + RETRY
    await asyncio.wait_for(candidate.leading.wait(), timeout=HANG_GUARD_S)

    lease = api.get("leases", NS, LEASE)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "replica-1"
    assert lease["spec"]["leaseTransitions"] == 1


async def test_a_leader_whose_lease_is_taken_stops_leading_at_once(
    api: KubeApiDouble, kube: Kube, running: Running
) -> None:
    stops: list[float] = []
    reads_at_stop: list[int] = []

    def stopped() -> None:
        stops.append(1.0)
        reads_at_stop.append(lease_reads(api))

    leader = running.start(kube, "replica-1", on_stopped_leading=stopped)
    await asyncio.wait_for(leader.leading.wait(), timeout=HANG_GUARD_S)

    lease = await call_json(kube.coordination.read_namespaced_lease, LEASE, NS)
    lease["spec"]["holderIdentity"] = "intruder"
    lease["spec"]["renewTime"] = "2030-01-01T00:00:00.000000Z"
    await call_json(kube.coordination.replace_namespaced_lease, LEASE, NS, lease)
    taken = lease_reads(api)
    await asyncio.wait_for(leader.not_leading.wait(), timeout=HANG_GUARD_S)

    assert stops == [1.0]
    assert leader.holder == "intruder"
    # At once: at its first read of the taken Lease, not after a deadline.
    assert reads_at_stop == [taken + 1]


class Blockable(TokenBucket):
    """A limiter the test can shut, so that every later API call hangs."""

    def __init__(self) -> None:
        super().__init__(1000, 1000)
        self.open = asyncio.Event()
        self.open.set()

    async def acquire(self) -> None:
        await self.open.wait()
        await super().acquire()


async def test_a_leader_that_cannot_renew_stops_before_its_lease_expires(
    api: KubeApiDouble, kube: Kube, running: Running
) -> None:
    events: list[str] = []
    limiter = Blockable()
    async with Kube(api.client_configuration(), limiter) as cut_off:
        leader = running.start(
            cut_off,
            "replica-1",
            on_started_leading=lambda: events.append("replica-1 started"),
            on_stopped_leading=lambda: events.append("replica-1 stopped"),
        )
        await asyncio.wait_for(leader.leading.wait(), timeout=HANG_GUARD_S)
        standby = running.start(
            kube, "replica-2", on_started_leading=lambda: events.append("replica-2 started")
        )
        await eventually(lambda: standby.holder == "replica-1", limit=HANG_GUARD_S)
        await asyncio.sleep(RETRY * 1.5)  # past at least one renewal

        limiter.open.clear()  # the API server becomes unreachable for the leader alone
        await asyncio.wait_for(standby.leading.wait(), timeout=HANG_GUARD_S)
        limiter.open.set()
        await running.stop(leader)

    # It stopped within renew_deadline of its last renewal, so before the
    # standby could consider the Lease expired: never two leaders at once.
    assert events == ["replica-1 started", "replica-1 stopped", "replica-2 started"]


async def test_raise_on_loss_ends_run_with_lease_lost(api: KubeApiDouble, kube: Kube) -> None:
    leader = LeaderElector(
        kube,
        namespace=NS,
        name=LEASE,
        identity="replica-1",
        lease_duration=DURATION,
        renew_deadline=DEADLINE,
        retry_period=RETRY,
        raise_on_loss=True,
    )
    task = asyncio.create_task(leader.run())
    await asyncio.wait_for(leader.leading.wait(), timeout=HANG_GUARD_S)
    lease = await call_json(kube.coordination.read_namespaced_lease, LEASE, NS)
    lease["spec"]["holderIdentity"] = "intruder"
    await call_json(kube.coordination.replace_namespaced_lease, LEASE, NS, lease)
    taken = lease_reads(api)

    with pytest.raises(LeaseLost, match="taken by intruder"):
        await asyncio.wait_for(task, timeout=HANG_GUARD_S)
    # At its first read of the taken Lease, not after a deadline.
    assert lease_reads(api) == taken + 1


async def test_stopping_releases_the_lease(
    api: KubeApiDouble, kube: Kube, running: Running
) -> None:
    leader = running.start(kube, "replica-1")
    await asyncio.wait_for(leader.leading.wait(), timeout=HANG_GUARD_S)

    await running.stop(leader)

    lease = api.get("leases", NS, LEASE)
    assert lease is not None
    assert not lease["spec"].get("holderIdentity")
