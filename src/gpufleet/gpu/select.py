"""Open the GPU source a command asked for: simulated, real NVML, or nvidia-smi XML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpufleet.core.errors import ConfigError
from gpufleet.gpu.source import GpuError, GpuSource


class SourceChoiceError(GpuError, ConfigError):
    """The GPU source flags contradict each other: a usage error, exit status 2."""


@dataclass(frozen=True, slots=True)
class SourceChoice:
    """What the user asked to read GPUs from; exactly one of the kinds is set."""

    simulate: str | None = None
    fleet_file: Path | None = None
    nvml: bool = False
    smi_xml: Path | None = None
    seed: int | None = None
    """``--seed``: given only with ``--simulate``; None when the flag was not given."""

    def validate(self) -> None:
        """Exactly one source, ``--seed`` only with a preset, and a preset that exists."""
        chosen = [
            flag
            for flag, on in (
                ("--simulate", self.simulate is not None),
                ("--fleet", self.fleet_file is not None),
                ("--nvml", self.nvml),
                ("--smi-xml", self.smi_xml is not None),
            )
            if on
        ]
        if len(chosen) != 1:
            got = ", ".join(chosen) if chosen else "none"
            raise SourceChoiceError(
                f"choose exactly one GPU source: --simulate PRESET, --fleet FILE, --nvml or "
                f"--smi-xml FILE (got {got})"
            )
        if self.seed is not None and self.simulate is None:
            # A fleet file carries its own seed; real and saved GPUs have theirs.
            raise SourceChoiceError(
                f"--seed applies only to --simulate PRESET, not to {chosen[0]}"
                + (" (a fleet file sets `seed:` itself)" if chosen[0] == "--fleet" else "")
            )
        if self.simulate is not None:
            from gpufleet.gpu.sim.presets import PRESETS, preset

            if self.simulate not in PRESETS:
                preset(self.simulate)  # raises UnknownPresetError, naming the presets

    @property
    def label(self) -> str:
        """The reading's ``source`` field: how the GPUs were read."""
        if self.simulate is not None:
            return f"simulated/{self.simulate}"
        if self.fleet_file is not None:
            return f"simulated/{self.fleet_file.name}"
        if self.smi_xml is not None:
            return "nvidia-smi"
        return "nvml"


def open_source(choice: SourceChoice) -> GpuSource:
    """Open the chosen source. Raises ``GpuError`` with a clear message on failure."""
    choice.validate()
    # Imported lazily: the simulator and the parser are only paid for when used.
    if choice.smi_xml is not None:
        from gpufleet.gpu.smi import SmiXmlSource

        return SmiXmlSource(path=choice.smi_xml)
    from gpufleet.gpu.nvml import NvmlSource

    if choice.nvml:
        return NvmlSource.real()
    from gpufleet.gpu import sim

    if choice.fleet_file is not None:
        fleet = sim.load_fleet(choice.fleet_file)
    else:
        fleet = sim.preset(str(choice.simulate), seed=choice.seed or 0)
    return NvmlSource(sim.SimulatedNvml(fleet))
