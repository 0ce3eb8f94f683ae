"""``gpufleet gpu``: look at the GPUs of this machine (or a simulated one)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from gpufleet.core.console import Column, fitted_table, stdout_console
from gpufleet.gpu.select import SourceChoice, open_source
from gpufleet.gpu.snapshot import take_snapshot
from gpufleet.gpu.source import GpuError

app = typer.Typer(help="Inspect GPUs: list them, or print simulated nvidia-smi XML.")

SimulateOpt = Annotated[
    str | None,
    typer.Option(
        "--simulate",
        metavar="PRESET",
        help="Read a simulated GPU preset (dgx-h100, dgx-a100, gb200, l4, mig-a100).",
    ),
]
FleetOpt = Annotated[
    Path | None,
    typer.Option("--fleet", metavar="FILE", help="Read a simulated fleet from a YAML file."),
]
NvmlOpt = Annotated[bool, typer.Option("--nvml", help="Read the real GPUs through NVML.")]
SmiXmlOpt = Annotated[
    Path | None,
    typer.Option("--smi-xml", metavar="FILE", help="Read a saved `nvidia-smi -q -x` document."),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="With --simulate: seed of the simulated identities (another seed is another "
        "machine's GPUs) [default 0].",
    ),
]


# On a narrow terminal the lesser columns go first, so that serial, UUID and PCI
# bus id stay whole.
_LIST_COLUMNS = (
    Column("idx", key=True),
    Column("serial", key=True),
    Column("uuid", key=True),
    Column("product", drop=1),
    Column("pci bus id", key=True),
    Column("cc", drop=3),
    Column("memory", drop=2),
    Column("mig", drop=4),
)


def _gib(value: int | None) -> str:
    return "N/A" if value is None else f"{value / 2**30:.1f} GiB"


@app.command("list")
def list_gpus(
    simulate: SimulateOpt = None,
    fleet: FleetOpt = None,
    nvml: NvmlOpt = False,
    smi_xml: SmiXmlOpt = None,
    seed: SeedOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the GPUs with their identity: index, serial, UUID, model, PCI id."""
    source = open_source(SourceChoice(simulate, fleet, nvml, smi_xml, seed))
    try:
        listing = source.devices()
    finally:
        source.close()
    if as_json:
        out = {
            "devices": [asdict(d) for d in listing.devices],
            "faults": [asdict(f) for f in listing.faults],
        }
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
        return
    rows: list[list[str | Text]] = []
    for d in listing.devices:
        cc = "N/A" if d.compute_capability is None else "{}.{}".format(*d.compute_capability)
        mig = (
            "N/A" if d.mig_mode is None else (f"on ({len(d.mig_devices)})" if d.mig_mode else "off")
        )
        rows.append([
            str(d.index), d.serial or "N/A", d.uuid, d.product_name, d.pci_bus_id, cc,
            _gib(d.memory_total_bytes), mig,
        ])  # fmt: skip
    for f in listing.faults:
        kind = Text(f.kind, style="red")
        rows.append([str(f.index), "?", f.uuid or "?", kind, f.pci_bus_id or "?", "", "", ""])
    console = stdout_console()
    console.print(fitted_table(console, f"{len(listing.devices)} GPU(s)", _LIST_COLUMNS, rows))
    # Below the table, where a narrow terminal cannot leave them out.
    for f in listing.faults:
        console.print(Text(f"GPU {f.index}: {f.kind}: {f.message}", style="red"))


@app.command("smi")
def smi(
    simulate: SimulateOpt = None,
    fleet: FleetOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Print what `nvidia-smi -q -x` would print on the simulated GPUs."""
    from gpufleet.gpu.smi import write_smi_xml

    if simulate is None and fleet is None:
        raise GpuError("gpu smi needs --simulate PRESET or --fleet FILE")
    source = open_source(SourceChoice(simulate=simulate, fleet_file=fleet, seed=seed))
    try:
        snap = take_snapshot(source)
    finally:
        source.close()
    sys.stdout.write(write_smi_xml(snap.devices, snap.samples, snap.processes))
