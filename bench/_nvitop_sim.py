"""Bench-only plumbing: one simulated GPU node, seen through a ``pynvml`` module.

``simulated_node`` builds the node both exporters read in
``bench_gpu_exporter.py``: the ``dgx-h100`` preset with real PIDs registered
as compute processes. ``pynvml_facade`` turns that simulator into a module
that can stand in for ``pynvml`` in ``sys.modules``, so a third-party exporter
that imports pynvml (nvitop) reads the simulator without knowing it.
"""

from __future__ import annotations

import types
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pynvml

from gpufleet.gpu import sim
from gpufleet.gpu.sim import SimulatedNvml

PRESET = "dgx-h100"
SEED = 0

# pynvml functions whose names start with ``nvml`` but which never reach the
# driver: nvitop uses them on structs and error codes, so they stay real.
_PURE_HELPERS = frozenset(
    {"nvmlExceptionClass", "nvmlStructToFriendlyObject", "nvmlFriendlyObjectToStruct"}
)

# Loaders of the real libnvidia-ml.so. Leaving them out also makes nvitop take
# its "plain pynvml" path (it checks for ``_nvmlGetFunctionPointer``) instead
# of calling C symbols directly, which a simulator cannot answer.
_LIBRARY_LOADERS = frozenset({"_nvmlGetFunctionPointer", "_LoadNvmlLibrary"})


def simulated_node(pids: Sequence[int]) -> SimulatedNvml:
    """The ``dgx-h100`` preset with ``pids`` spread evenly over its GPUs as compute processes.

    Memory and SM utilization vary per process so that no exporter can
    collapse equal values; the same ``pids`` always give the same node.
    """
    nvml = sim.open(PRESET, seed=SEED)
    gpu_count = len(nvml.fleet.gpus)
    for i, pid in enumerate(pids):
        nvml.add_process(
            i % gpu_count,
            pid,
            used_memory_bytes=(256 + (i * 97) % 1792) << 20,
            sm_util_percent=(i * 37) % 101,
        )
    return nvml


class FacadeModule(types.ModuleType):
    """A ``pynvml`` module whose NVML calls go to a ``SimulatedNvml``.

    ``missing_calls`` counts the calls to NVML functions the simulator does
    not implement (each raised ``NVMLError_NotSupported``).
    """

    missing_calls: Counter[str]


def pynvml_facade(nvml: SimulatedNvml) -> FacadeModule:
    """A module with pynvml's constants, structs and errors and the simulator's functions.

    Every NVML function of pynvml that ``SimulatedNvml`` implements is bound to
    ``nvml``; every other one raises ``NVMLError_NotSupported``, the answer of
    a real driver for a feature a GPU does not report, which nvitop turns into
    ``N/A`` without logging (``FunctionNotFound`` would log a traceback).
    """
    module = FacadeModule("pynvml", pynvml.__doc__)
    module.missing_calls = Counter()
    for name, value in vars(pynvml).items():
        if name in _LIBRARY_LOADERS or name in ("__name__", "__doc__", "__spec__", "__loader__"):
            continue
        if _is_nvml_call(name, value):
            implemented = getattr(nvml, name, None)
            if callable(implemented):
                value = implemented
            else:
                value = _not_supported(name, module.missing_calls)
        setattr(module, name, value)
    return module


def _is_nvml_call(name: str, value: object) -> bool:
    return (
        name.startswith("nvml")
        and isinstance(value, types.FunctionType)
        and name not in _PURE_HELPERS
    )


def _not_supported(name: str, calls: Counter[str]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    call.__name__ = call.__qualname__ = name
    return call
