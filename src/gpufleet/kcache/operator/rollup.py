"""Node objects → a cache's roll-up: counts, ``ready`` "n/m", the Ready condition, old digests.

Pure functions over the API's JSON. Each node object (GKMCacheNode / ClusterGKMCacheNode)
reports, per digest of its cache, one GKM-style condition whose type is the state on that
node (Pending, Downloading, Extracted, Running, Outdated, Error, Incompatible) and the pods
that mount it. The cache's Ready condition is True when every compatible node has the
resolved digest Extracted or Running; its reason is the worst state over the compatible
nodes in GKM's roll-up order (Error > Outdated > Running > Extracted > Downloading > Pending).
A node where an older digest is still mounted counts as Outdated, even when the resolved
digest is ready there too: new pods get the new bytes, running ones keep the old.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpufleet.kcache.objects import ROLLUP_ORDER, DigestState, NodeObject

__all__ = ["READY_STATES", "NodeView", "Rollup", "Verdict", "node_view", "roll_up"]

READY_STATES = frozenset({DigestState.EXTRACTED, DigestState.RUNNING})
"""States of the resolved digest on a node that make the node ready."""
_MESSAGE_NODES = 3  # how many nodes a message names before "and N more"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A condition as the operator computes it; `status.wanted_status` dates it."""

    type: str
    status: bool
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node's report of one cache, reduced to what the roll-up needs."""

    node: str
    state: DigestState
    """The resolved digest's state there (Pending when the node has no entry for it)."""
    message: str
    running_pods: int
    """Pods mounting the resolved digest."""
    outdated_pods: int
    """Pods mounting any other digest of the cache."""
    mounted_old: frozenset[str]
    """Other digests of the cache that pods there still mount."""

    @property
    def compatible(self) -> bool:
        """Whether some GPU of the node can use the cache."""
        return self.state != DigestState.INCOMPATIBLE

    @property
    def ready(self) -> bool:
        """Whether a pod there can mount the resolved digest now."""
        return self.state in READY_STATES

    @property
    def in_use(self) -> bool:
        """Whether any pod there mounts any digest of the cache."""
        return self.running_pods + self.outdated_pods > 0

    @property
    def rolled_up(self) -> DigestState:
        """The node's place in the roll-up order."""
        if self.state == DigestState.ERROR:
            return DigestState.ERROR
        if self.outdated_pods or self.mounted_old:
            return DigestState.OUTDATED
        return self.state if self.state in ROLLUP_ORDER else DigestState.PENDING


def node_view(node_object: NodeObject, cache_name: str, digest: str | None) -> NodeView:
    """How `node_object` reports cache `cache_name`, with `digest` the resolved one."""
    entries = node_object.status.caches.get(cache_name, {})
    state, message, running = DigestState.PENDING, "", 0
    outdated, old = 0, set()
    for entry_digest, entry in entries.items():
        if entry_digest == digest:
            state = entry.state or DigestState.PENDING
            message = next(
                (c.message for c in entry.conditions if c.status == "True" and c.type == state),
                "",
            )
            running = len(entry.pods)
        elif entry.pods:
            outdated += len(entry.pods)
            old.add(entry_digest)
    if digest is None:
        state, message = DigestState.PENDING, ""
    node = node_object.node_name or node_object.metadata.name
    return NodeView(node, state, message, running, outdated, frozenset(old))


@dataclass(frozen=True, slots=True)
class Rollup:
    """What the node objects say about one cache."""

    counts: dict[str, int]
    ready: str
    """``"<ready nodes>/<compatible nodes>"``: the printer column."""
    condition: Verdict
    """The Ready condition."""
    previous_digests: list[str] = field(default_factory=list)
    """Older digests still mounted somewhere, sorted."""


def _named(views: Iterable[NodeView], *, with_message: bool = True) -> str:
    views = sorted(views, key=lambda v: v.node)
    parts = [f"{v.node}: {v.message}" if with_message and v.message else v.node for v in views]
    shown = parts[:_MESSAGE_NODES]
    if len(parts) > _MESSAGE_NODES:
        shown.append(f"and {len(parts) - _MESSAGE_NODES} more")
    return "; ".join(shown)


def roll_up(node_objects: Iterable[NodeObject], cache_name: str, digest: str | None) -> Rollup:
    """Counts, the ready column, the Ready condition and the still-mounted old digests."""
    views = sorted(
        (node_view(obj, cache_name, digest) for obj in node_objects), key=lambda v: v.node
    )
    compatible = [v for v in views if v.compatible]
    ready = [v for v in compatible if v.ready]
    in_use = sum(1 for v in views if v.in_use)
    counts = {
        "nodeCnt": len(views),
        "nodeReadyCnt": len(ready),
        "nodeIncompatibleCnt": len(views) - len(compatible),
        "nodeInUseCnt": in_use,
        "nodeNotInUseCnt": len(views) - in_use,
        "nodeErrorCnt": sum(1 for v in views if v.state == DigestState.ERROR),
        "podRunningCnt": sum(v.running_pods for v in views),
        "podOutdatedCnt": sum(v.outdated_pods for v in views),
    }
    previous = sorted({d for v in views for d in v.mounted_old})
    return Rollup(
        counts, f"{len(ready)}/{len(compatible)}", _ready_condition(views, compatible, digest),
        previous,
    )  # fmt: skip


def _ready_condition(
    views: Sequence[NodeView], compatible: Sequence[NodeView], digest: str | None
) -> Verdict:
    if digest is None:
        return Verdict(
            "Ready", False, DigestState.PENDING, "no digest is resolved and verified yet"
        )
    if not views:
        return Verdict("Ready", False, DigestState.PENDING, "no node has reported the cache yet")
    if not compatible:
        return Verdict(
            "Ready",
            False,
            DigestState.INCOMPATIBLE,
            f"no node has a compatible GPU: {_named(views)}",
        )
    worst = min(compatible, key=lambda v: ROLLUP_ORDER.index(v.rolled_up)).rolled_up
    ready = [v for v in compatible if v.ready]
    summary = f"{len(ready)}/{len(compatible)} compatible nodes ready"
    if worst == DigestState.ERROR:
        failing = [v for v in compatible if v.state == DigestState.ERROR]
        summary += f"; failing on {_named(failing)}"
    elif worst == DigestState.OUTDATED:
        old = [v for v in compatible if v.rolled_up == DigestState.OUTDATED]
        pods = sum(v.outdated_pods for v in old)
        summary += f"; {pods} pods still mount an older digest on {_named(old, with_message=False)}"
    elif len(ready) < len(compatible):
        waiting = [v for v in compatible if not v.ready]
        summary += f"; waiting for {_named(waiting, with_message=False)}"
    return Verdict("Ready", len(ready) == len(compatible), worst, summary)
