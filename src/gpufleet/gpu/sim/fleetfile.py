"""Reading a fleet description (a YAML file, or the dict it parses to) into a ``SimFleet``.

The format is described in ``gpufleet.gpu.sim``. This is the one place that
needs both the presets (a file may start from one) and the library (a file
may name NVML functions, which must be the simulator's), so it sits above
both and the fleet model below them stays plain data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pydantic
import yaml

from gpufleet.gpu.sim.fleet import SimError, SimFleet
from gpufleet.gpu.sim.library import check_function_names
from gpufleet.gpu.sim.presets import PRESETS, preset


class FleetFileError(SimError):
    """A fleet description (YAML file or dict) is invalid; the message names the field."""


_FLEET = pydantic.TypeAdapter(SimFleet)


def fleet_from_dict(data: object, *, origin: str = "<fleet>") -> SimFleet:
    """Build a fleet from a parsed fleet file (see ``gpufleet.gpu.sim`` for the format).

    ``origin`` names the file in error messages.
    """
    if not isinstance(data, dict):
        raise FleetFileError(f"{origin}: a fleet file must be a mapping, got {type(data).__name__}")
    if "preset" in data:
        name = data["preset"]
        if name not in PRESETS:
            raise FleetFileError(f"{origin}: preset: unknown preset {name!r} ({_known(PRESETS)})")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FleetFileError(f"{origin}: seed: must be an integer, got {seed!r}")
        base = dataclasses.asdict(preset(name, seed))
        merged = _apply_overrides(base, data, origin)
    else:
        if "seed" in data:
            raise FleetFileError(f"{origin}: seed: only allowed together with preset")
        merged = data
    fleet = _validate(merged, origin)
    _check_consistency(fleet, origin)
    return fleet


def load_fleet(path: str | Path) -> SimFleet:
    """Read a YAML fleet file; raises ``FleetFileError`` naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetFileError(f"{path}: cannot read fleet file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise FleetFileError(
            f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); a fleet file is YAML"
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FleetFileError(f"{path}: not valid YAML: {exc}") from exc
    return fleet_from_dict(data, origin=str(path))


def _apply_overrides(base: dict[str, Any], data: dict[str, Any], origin: str) -> dict[str, Any]:
    merged = dict(base)
    for key, value in data.items():
        if key in ("preset", "seed"):
            continue
        if key != "gpus":
            merged[key] = value
            continue
        if not isinstance(value, dict):
            raise FleetFileError(
                f"{origin}: gpus: with a preset, gpus maps a GPU index to its overrides"
            )
        gpus = list(merged["gpus"])
        for index, overrides in value.items():
            if not isinstance(index, int) or not 0 <= index < len(gpus):
                raise FleetFileError(
                    f"{origin}: gpus.{index}: no GPU with that index (the preset has {len(gpus)})"
                )
            if not isinstance(overrides, dict):
                raise FleetFileError(f"{origin}: gpus.{index}: overrides must be a mapping")
            gpus[index] = {**gpus[index], **overrides}
        merged["gpus"] = gpus
    return merged


def _validate(data: dict[str, Any], origin: str) -> SimFleet:
    try:
        return _FLEET.validate_python(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        unknown = first["type"] == "unexpected_keyword_argument"
        message = "unknown field" if unknown else first["msg"]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise FleetFileError(f"{origin}: {where}: {message}{more}") from exc


def _check_consistency(fleet: SimFleet, origin: str) -> None:
    seen: set[str] = set()
    for index, gpu in enumerate(fleet.gpus):
        try:
            check_function_names(gpu.unsupported)
            check_function_names(gpu.errors)
        except SimError as exc:
            raise FleetFileError(f"{origin}: gpus.{index}: {exc}") from None
        uuids = [gpu.uuid, *(mig.uuid for mig in gpu.mig_instances)]
        for uuid in uuids:
            if uuid in seen:
                raise FleetFileError(f"{origin}: gpus.{index}.uuid: duplicate UUID {uuid}")
            seen.add(uuid)
        for pos, process in enumerate(gpu.processes):
            mig = process.mig_index
            if mig is not None and not 0 <= mig < len(gpu.mig_instances):
                raise FleetFileError(
                    f"{origin}: gpus.{index}.processes.{pos}.mig_index: "
                    f"no MIG instance {mig} on this GPU"
                )


def _known(names: tuple[str, ...]) -> str:
    return "known: " + ", ".join(names)
