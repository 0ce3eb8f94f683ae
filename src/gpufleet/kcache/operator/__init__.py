"""The kernel cache's cluster operator (``gpufleet cache operator``), on kopf.

It resolves each GKMCache's and ClusterGKMCache's image to a digest, lets only a digest
the signature policy accepts reach the nodes, rolls the node objects up into the cache's
status, and holds a deleted cache with GKM's finalizer until no node has it any more.

- `run`: the process, kopf in-process inside gpufleet's leader election; `settings` its
  environment; `errors` its own failures;
- `handlers`: the kopf side, which watch events go where;
- `controller`: the reconciler, per cache, with `versions` (which copy of an object is
  newer) under it;
- `resolve`: ``spec.image`` to the digest nodes may pull (the tag, then the policy);
- `rollup`: node objects to a cache's counts, ``ready`` and Ready condition;
- `status`: the wanted status and the patch that writes it;
- `api`: the calls to the API server, exactly those its RBAC grants.

See docs/kcache-cluster.md, "Operator".
"""

from gpufleet.kcache.operator.errors import OperatorError
from gpufleet.kcache.operator.run import OperatorRuntime, run_operator
from gpufleet.kcache.operator.settings import ClusterCacheAccess, OperatorSettings

__all__ = [
    "ClusterCacheAccess",
    "OperatorError",
    "OperatorRuntime",
    "OperatorSettings",
    "run_operator",
]
