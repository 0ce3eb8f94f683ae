"""The operator's own failures (the per-cache ones are logged and retried, never raised)."""

from __future__ import annotations

from gpufleet.kcache.errors import KcacheError

__all__ = ["OperatorError"]


class OperatorError(KcacheError):
    """The operator cannot go on: kopf stopped on its own, or failed to start."""
