"""Prometheus metrics of the node process, read from its state at scrape time.

A collector yields every family from a snapshot of the state and the counters of the agent,
the CSI side and the API writers, so a digest that goes away takes its series with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpufleet.kcache.node.agent import Agent
from gpufleet.kcache.node.state import Phase
from gpufleet.kcache.node.volumes import NodeVolumes

__all__ = ["PREFIX", "NodeCollector"]

PREFIX = "gpufleet_kcache_node"

Family = GaugeMetricFamily | CounterMetricFamily


class NodeCollector(Collector):
    """The node's caches by state, pulls, pull failures, GC removals, publishes, API writes."""

    def __init__(self, agent: Agent, volumes: NodeVolumes) -> None:
        self._agent = agent
        self._volumes = volumes

    def collect(self) -> Iterable[Family]:
        agent = self._agent
        states = Counter(
            agent.state.phase(key, entry.digest) or entry.phase
            for key, entry in agent.state.pulls()
        )
        caches = GaugeMetricFamily(
            f"{PREFIX}_caches", "Cache digests on this node by state.", labels=["state"]
        )
        for phase in Phase:
            caches.add_metric([phase.value], states.get(phase, 0))
        yield caches
        yield GaugeMetricFamily(
            f"{PREFIX}_volumes", "Volumes published now.", value=len(agent.state.uses)
        )
        yield CounterMetricFamily(
            f"{PREFIX}_pulls", "Pull attempts (each retry counts).", value=agent.pulls_total
        )
        yield CounterMetricFamily(
            f"{PREFIX}_pull_failures", "Pull attempts that failed.", value=agent.pull_failures_total
        )
        yield CounterMetricFamily(
            f"{PREFIX}_gc_removed", "Store entries removed by GC.", value=agent.gc_removed_total
        )
        yield CounterMetricFamily(
            f"{PREFIX}_publishes", "Volumes published.", value=self._volumes.published_count
        )
        writes = CounterMetricFamily(
            f"{PREFIX}_api_writes", "API writes by what they wrote.", labels=["object"]
        )
        writes.add_metric(["node_object"], agent.objects.writes)
        writes.add_metric(["node_label"], agent.labels.writes)
        yield writes

    def describe(self) -> Iterable[Family]:
        yield GaugeMetricFamily(f"{PREFIX}_caches", "", labels=["state"])
        yield GaugeMetricFamily(f"{PREFIX}_volumes", "")
        for name in ("pulls", "pull_failures", "gc_removed", "publishes"):
            yield CounterMetricFamily(f"{PREFIX}_{name}", "")
        yield CounterMetricFamily(f"{PREFIX}_api_writes", "", labels=["object"])
