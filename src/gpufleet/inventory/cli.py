"""``gpufleet inventory``: scan this machine's GPUs, and ask where GPUs have been."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gpufleet.core.config import load_settings
from gpufleet.core.console import stdout_console
from gpufleet.gpu.cli import FleetOpt, NvmlOpt, SeedOpt, SimulateOpt, SmiXmlOpt
from gpufleet.gpu.select import SourceChoice, open_source
from gpufleet.inventory.config import HistorySettings, ScanSettings
from gpufleet.inventory.errors import HistoryError
from gpufleet.inventory.exporters.base import Exporter, make_exporter
from gpufleet.inventory.history import History, Placement
from gpufleet.inventory.local import ScanResult, resolve_machine_id, scan_once

app = typer.Typer(help="GPU inventory: which physical GPU sat in which node and machine, when.")

DbOpt = Annotated[
    Path | None,
    typer.Option(
        "--db",
        metavar="PATH",
        help="SQLite inventory file [env SQLITE_PATH; default gpufleet-inventory.db].",
    ),
]


@app.command()
def scan(
    simulate: SimulateOpt = None,
    fleet: FleetOpt = None,
    nvml: NvmlOpt = False,
    smi_xml: SmiXmlOpt = None,
    seed: SeedOpt = 0,
    exporter: Annotated[
        list[str] | None,
        typer.Option(
            "--exporter",
            "-e",
            metavar="NAME",
            help="Where readings go: stdout, "
            "sqlite; repeat or comma-separate for several [env EXPORTER_TYPE; "
            "default stdout].",
        ),
    ] = None,
    db: DbOpt = None,
    cluster: Annotated[
        str | None, typer.Option("--cluster", help="Cluster name [env CLUSTER_NAME; required].")
    ] = None,
    node: Annotated[
        str | None, typer.Option("--node", help="Node name [env NODE_NAME; default hostname].")
    ] = None,
    machine_id: Annotated[
        str | None,
        typer.Option(
            "--machine-id",
            help="Machine id [env MACHINE_ID; default the DMI product UUID, else board serial].",
        ),
    ] = None,
) -> None:
    """Read this machine's GPUs once and emit one reading per GPU."""
    settings = load_settings(
        ScanSettings,
        exporter_type=exporter or None,
        sqlite_path=db,
        cluster_name=cluster,
        node_name=node,
        machine_id=machine_id,
    )
    choice = SourceChoice(simulate, fleet, nvml, smi_xml, seed)
    result = asyncio.run(_scan(settings, choice))
    if result.failed_exporters:
        raise typer.Exit(1)


async def _scan(settings: ScanSettings, choice: SourceChoice) -> ScanResult:
    choice.validate()
    machine = resolve_machine_id(settings.machine_id, settings.dmi_dir)
    exporters: list[Exporter] = [
        make_exporter(kind, sqlite_path=settings.sqlite_path) for kind in settings.exporter_type
    ]
    source = open_source(choice)
    try:
        return await scan_once(
            source,
            exporters,
            cluster=settings.cluster_name,
            node=settings.node_name,
            machine=machine,
            source_label=choice.label,
        )
    finally:
        source.close()
        for exp in exporters:
            await exp.close()


@app.command()
def history(
    db: DbOpt = None,
    gpu: Annotated[
        str | None,
        typer.Option("--gpu", metavar="SERIAL", help="Where this GPU has been (serial or UUID)."),
    ] = None,
    machine: Annotated[
        str | None, typer.Option("--machine", metavar="ID", help="GPUs this machine has had.")
    ] = None,
    node: Annotated[
        str | None, typer.Option("--node", metavar="NAME", help="GPUs this node has had.")
    ] = None,
    moved: Annotated[
        bool, typer.Option("--moved", help="GPUs seen in more than one machine.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Answer where GPUs have been, from the SQLite inventory."""
    questions = [q for q in (gpu, machine, node) if q is not None] + (["moved"] if moved else [])
    if len(questions) != 1:
        raise HistoryError("ask exactly one of --gpu, --machine, --node or --moved")
    settings = load_settings(HistorySettings, sqlite_path=db)
    store = History(settings.sqlite_path)
    try:
        if gpu is not None:
            rows, title = store.gpu(gpu), f"GPU {gpu}"
        elif machine is not None:
            rows, title = store.machine(machine), f"machine {machine}"
        elif node is not None:
            rows, title = store.node(node), f"node {node}"
        else:
            rows, title = store.moved(), "GPUs seen in more than one machine"
    finally:
        store.close()
    _print_placements(rows, title, as_json)


def _print_placements(rows: list[Placement], title: str, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
        return
    table = Table(title=f"{title}: {len(rows)} placement(s)")
    for column in ("gpu", "uuid", "machine", "node", "cluster", "first seen", "last seen"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.gpu, r.uuid, r.machine, r.node, r.cluster, r.first_seen, r.last_seen)
    stdout_console().print(table)
