"""Which optional extra installs a missing module, said in one line.

`pip install gpufleet` installs the core: simulated GPUs, NVML, nvidia-smi
parsing, the stdout/SQLite/HTTP exporters, the device API and the GPU exporter
outside Kubernetes. Everything else needs an extra, and the modules of an
extra are imported only by the code that uses them. When one is missing, the
command says which extra to install instead of showing a traceback.
"""

from __future__ import annotations

from gpufleet.core.errors import ConfigError

__all__ = ["EXTRA_OF_MODULE", "MissingExtraError", "missing_extra"]

EXTRA_OF_MODULE: dict[str, str] = {
    "kubernetes_asyncio": "k8s",
    "psycopg": "postgres",
    "psycopg_pool": "postgres",
    "boto3": "s3",
    "botocore": "s3",
    "httpx": "kcache",
    "cryptography": "kcache",
}
"""Top-level module → the extra of pyproject.toml that installs it."""


class MissingExtraError(ConfigError):
    """A command needs an optional extra that is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this command needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'gpufleet[{extra}]'"
        )
        self.module = module
        self.extra = extra


def missing_extra(exc: BaseException) -> MissingExtraError | None:
    """The extra to install for ``exc``, if it is (or wraps) a missing extra's module."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and current.name:
            top = current.name.split(".")[0]
            if top in EXTRA_OF_MODULE:
                return MissingExtraError(top, EXTRA_OF_MODULE[top])
        if isinstance(current, BaseExceptionGroup):
            for inner in current.exceptions:
                found = missing_extra(inner)
                if found is not None:
                    return found
        current = current.__cause__ or current.__context__
    return None
