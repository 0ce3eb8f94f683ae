"""How nvidia-smi writes values, in both directions: "N/A", units, Yes/No, names.

Shared by the XML parser, the CSV parser and the writer so that what one side
writes the other reads back exactly.
"""

from __future__ import annotations

import re
from datetime import datetime

from gpufleet.gpu.source import GpuError

MIB = 1024 * 1024
"""nvidia-smi prints memory in whole MiB; bytes round-trip at this precision."""

NA = "N/A"

_ABSENT = frozenset(
    s.casefold()
    for s in (
        "",
        "N/A",
        "[N/A]",
        "Not Supported",
        "[Not Supported]",
        "Unknown Error",
        "[Unknown Error]",
        "Insufficient Permissions",
        "[Insufficient Permissions]",
        "Requested functionality has been deprecated",
    )
)

_NUMBER = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*([A-Za-z%/()]*)$")

_MEMORY_UNITS = {"": MIB, "B": 1, "KiB": 1024, "MiB": MIB, "GiB": 1024 * MIB, "TiB": 1024**2 * MIB}

_TRUE = frozenset({"enabled", "yes", "active"})
_FALSE = frozenset({"disabled", "no", "not active"})

# nvidia-smi's product_architecture strings that are not just a capitalised model name.
_ARCH_FROM_SMI = {"ada lovelace": "ada"}
_ARCH_TO_SMI = {v: k.title() for k, v in _ARCH_FROM_SMI.items()}


class SmiParseError(GpuError):
    """nvidia-smi output could not be read; the message names the origin and the place."""


def present(text: str | None) -> str | None:
    """Return the stripped value, or ``None`` where nvidia-smi says it has none ("N/A"...)."""
    if text is None:
        return None
    value = text.strip()
    return None if value.casefold() in _ABSENT else value


def _split(text: str, units: frozenset[str], where: str) -> tuple[str, str]:
    match = _NUMBER.match(text)
    if match is None or match.group(2) not in units:
        raise SmiParseError(f"{where} has unexpected value {text!r}")
    return match.group(1), match.group(2)


def to_int(text: str | None, units: frozenset[str], where: str) -> int | None:
    """Parse ``"33 C"``, ``"0 %"``, ``"1980 MHz"`` or a bare integer; ``None`` for N/A."""
    value = present(text)
    if value is None:
        return None
    number, _ = _split(value, units | {""}, where)
    try:
        return int(number)
    except ValueError:
        raise SmiParseError(f"{where} is not a whole number: {value!r}") from None


def to_float(text: str | None, units: frozenset[str], where: str) -> float | None:
    """Parse ``"69.89 W"`` or a bare number; ``None`` for N/A."""
    value = present(text)
    if value is None:
        return None
    number, _ = _split(value, units | {""}, where)
    return float(number)


def to_bytes(text: str | None, where: str) -> int | None:
    """Parse ``"81559 MiB"`` (or a bare number of MiB, as ``nounits`` prints it) into bytes."""
    value = present(text)
    if value is None:
        return None
    number, unit = _split(value, frozenset(_MEMORY_UNITS), where)
    if "." in number:
        return int(float(number) * _MEMORY_UNITS[unit])
    return int(number) * _MEMORY_UNITS[unit]


def to_bool(text: str | None, where: str) -> bool | None:
    """Parse ``Enabled``/``Disabled``, ``Yes``/``No``; ``None`` for N/A."""
    value = present(text)
    if value is None:
        return None
    folded = value.casefold()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False
    raise SmiParseError(f"{where} has unexpected value {value!r}")


def to_compute_capability(text: str | None, where: str) -> tuple[int, int] | None:
    """Parse ``"9.0"`` into ``(9, 0)``."""
    value = present(text)
    if value is None:
        return None
    major, dot, minor = value.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise SmiParseError(f"{where} has unexpected value {value!r}")
    return int(major), int(minor)


def architecture_from_smi(text: str | None) -> str | None:
    """nvidia-smi's architecture name in the model's spelling: ``"Ada Lovelace"`` -> ``"ada"``."""
    value = present(text)
    if value is None:
        return None
    folded = value.casefold()
    return _ARCH_FROM_SMI.get(folded, folded)


def architecture_to_smi(architecture: str | None) -> str:
    """The inverse of :func:`architecture_from_smi`."""
    if architecture is None:
        return NA
    return _ARCH_TO_SMI.get(architecture, architecture.title())


def mig_uuid_for(
    gpu_uuid: str, gpu_instance_id: int | None, compute_instance_id: int | None, index: int
) -> str:
    """The identifier given to a MIG device, since ``nvidia-smi -q -x`` prints no MIG UUID.

    It is the legacy ``MIG-<GPU-UUID>/<GI>/<CI>`` name that drivers before R470 used
    in ``CUDA_VISIBLE_DEVICES``: stable for as long as the instance exists and unique
    per GPU. Without instance ids (never seen in practice) the MIG index stands in.
    """
    if gpu_instance_id is None or compute_instance_id is None:
        return f"MIG-{gpu_uuid}/index-{index}"
    return f"MIG-{gpu_uuid}/{gpu_instance_id}/{compute_instance_id}"


def smi_timestamp(moment: datetime) -> str:
    """The ``<timestamp>`` format nvidia-smi uses (C ``ctime``): ``Fri Oct  2 19:30:00 2026``."""
    return moment.ctime()


def mib_floor(value: int | None) -> int | None:
    """Bytes as they come back from a document that holds whole MiB."""
    return None if value is None else value // MIB * MIB
