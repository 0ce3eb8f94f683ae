"""The handles of the simulated NVML: real ctypes pointers holding an opaque token.

Device handles and event sets are the pointer types pynvml uses
(``c_nvmlDevice_t``, ``c_nvmlEventSet_t``), but they point at nothing: the
token only encodes which GPU, MIG device or event set is meant, and it is
never dereferenced. Code that would only work with Python-object handles
(hashing them, comparing them with ``==``) therefore fails here as it would on
real NVML, and code that keys on the pointer value works on both.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pynvml

_HANDLE_BASE = 0x5100_0000
_GPU_STRIDE = 0x100
"""Slot 0 of a GPU's stride is its own handle, slot ``k`` its MIG device ``k - 1``."""
_EVENT_SET_BASE = 0x5E00_0000


def address(pointer: Any) -> int:
    """The pointer value of a handle or event set: the token it holds."""
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def device_handle(index: int, mig: int | None = None) -> Any:
    """The ``c_nvmlDevice_t`` of GPU ``index``, or of its MIG device in slot ``mig``."""
    slot = 0 if mig is None else mig + 1
    token = ctypes.c_void_p(_HANDLE_BASE + index * _GPU_STRIDE + slot)
    return ctypes.cast(token, pynvml.c_nvmlDevice_t)


def device_of(handle: Any) -> tuple[int, int | None]:
    """The GPU index and MIG slot (``None`` for the GPU itself) a device handle names.

    The index is not checked against any fleet: a forged handle gives an index
    out of range, which the library answers with InvalidArgument.
    """
    index, slot = divmod(address(handle) - _HANDLE_BASE, _GPU_STRIDE)
    return index, None if slot == 0 else slot - 1


def event_set_handle(number: int) -> Any:
    """The ``c_nvmlEventSet_t`` of the ``number``-th event set of a library."""
    token = ctypes.c_void_p(_EVENT_SET_BASE + number)
    return ctypes.cast(token, pynvml.c_nvmlEventSet_t)
