"""The kernel cache's cluster operator (``gpufleet cache operator``), on kopf.

It resolves each GKMCache's and ClusterGKMCache's image to a digest, lets only a digest
the signature policy accepts reach the nodes, rolls the node objects up into the cache's
status, and holds a deleted cache with GKM's finalizer until no node has it any more.
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
