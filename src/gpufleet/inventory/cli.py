"""``gpufleet inventory``: scan this machine's GPUs, and ask where GPUs have been."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from gpufleet.core.config import GpufleetSettings, load_settings
from gpufleet.core.console import Column, fitted_table, stdout_console
from gpufleet.core.errors import ConfigError
from gpufleet.gpu.cli import FleetOpt, NvmlOpt, SeedOpt, SimulateOpt, SmiXmlOpt
from gpufleet.gpu.select import SourceChoice, open_source
from gpufleet.inventory.config import HistorySettings, PodWatchSettings, ScanSettings
from gpufleet.inventory.delivery import Delivery
from gpufleet.inventory.errors import ExporterError, HistoryError, InventoryError
from gpufleet.inventory.history import History, Placement, PlacementStore
from gpufleet.inventory.local import ScanResult, resolve_machine_id, scan_once
from gpufleet.inventory.wiring import (
    Interruption,
    close_deliveries,
    interrupt_deliveries_on_signals,
    open_delivery,
    run_export_test,
)

if TYPE_CHECKING:
    from gpufleet.inventory.service import ProcessorFactory

S = TypeVar("S", bound=GpufleetSettings)
W = TypeVar("W", bound=PodWatchSettings)

app = typer.Typer(help="GPU inventory: which physical GPU sat in which node and machine, when.")

ExporterOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exporter",
        "-e",
        metavar="NAME",
        help="Where readings go: stdout, sqlite, postgres, s3, http; repeat or comma-separate "
        "for several [env EXPORTER_TYPE; default stdout].",
    ),
]
ClusterOpt = Annotated[
    str | None, typer.Option("--cluster", help="Cluster name [env CLUSTER_NAME; required].")
]
NodeOpt = Annotated[
    str | None, typer.Option("--node", help="Node name [env NODE_NAME; default hostname].")
]
DbOpt = Annotated[
    Path | None,
    typer.Option(
        "--db",
        metavar="PATH",
        help="SQLite inventory file [env SQLITE_PATH; default gpufleet-inventory.db].",
    ),
]


# The settings field of each shared flag whose parameter is named otherwise.
_FIELD_OF_FLAG = {
    "exporter": "exporter_type",
    "db": "sqlite_path",
    "cluster": "cluster_name",
    "node": "node_name",
}


def _settings(model: type[S], **flags: object) -> S:
    """``model`` from the environment, with the flags given on top.

    Every command hands its flags here by parameter name; the shared ones
    (``--exporter``, ``--db``, ``--cluster``, ``--node``) are renamed to their
    settings field, and an empty ``--exporter`` list counts as not given.
    """
    overrides = {_FIELD_OF_FLAG.get(name, name): value for name, value in flags.items()}
    if "exporter_type" in overrides:
        overrides["exporter_type"] = overrides["exporter_type"] or None
    return load_settings(model, **overrides)


def _watch_pods(
    model: type[W], processor: Callable[[W], ProcessorFactory], **flags: object
) -> None:
    """Run a pod watch (controller or check) with ``processor`` until stopped."""
    from gpufleet.inventory.service import run_pod_watch

    settings = _settings(model, **flags)
    asyncio.run(run_pod_watch(settings, processor(settings)))


@app.command()
def scan(
    simulate: SimulateOpt = None,
    fleet: FleetOpt = None,
    nvml: NvmlOpt = False,
    smi_xml: SmiXmlOpt = None,
    seed: SeedOpt = None,
    exporter: ExporterOpt = None,
    db: DbOpt = None,
    cluster: ClusterOpt = None,
    node: NodeOpt = None,
    machine_id: Annotated[
        str | None,
        typer.Option(
            "--machine-id",
            help="Machine id [env MACHINE_ID; default the DMI product UUID, else board serial].",
        ),
    ] = None,
) -> None:
    """Read this machine's GPUs once and emit one reading per GPU."""
    settings = _settings(
        ScanSettings, exporter=exporter, db=db, cluster=cluster, node=node, machine_id=machine_id
    )
    choice = SourceChoice(simulate, fleet, nvml, smi_xml, seed)
    result, interruption = asyncio.run(_scan(settings, choice))
    if interruption.signum is not None:
        sys.stderr.write(f"gpufleet: {_interrupted(result, interruption, settings)}\n")
        raise typer.Exit(128 + interruption.signum)
    problems = list(result.errors.values())
    late = {name: n for name, n in result.undelivered.items() if name not in result.errors}
    if late:
        problems.append(
            f"not delivered within DELIVERY_TIMEOUT={settings.delivery_timeout:g}s: "
            f"{_left(late)} left in the spool at {settings.spool_dir}; the next run with the "
            "same SPOOL_DIR delivers them first"
        )
    if result.misconfigured:
        raise ConfigError("; ".join(problems))
    if problems:
        raise InventoryError("; ".join(problems))


def _left(undelivered: dict[str, int]) -> str:
    return ", ".join(f"{n} reading(s) for {name}" for name, n in undelivered.items())


def _interrupted(result: ScanResult, interruption: Interruption, settings: ScanSettings) -> str:
    """What a signal left behind, in one line: which readings wait in which spool."""
    waiting = [
        f"{n} reading(s) for {name} are still in the spool at {settings.spool_dir / name}.spool"
        for name, n in result.undelivered.items()
        if n
    ]
    if not waiting:
        return f"interrupted by {interruption.signal_name}; nothing was left undelivered"
    return (
        f"interrupted by {interruption.signal_name}: {'; '.join(waiting)}; the next run "
        "with the same SPOOL_DIR sends them first"
    )


async def _scan(settings: ScanSettings, choice: SourceChoice) -> tuple[ScanResult, Interruption]:
    choice.validate()
    machine = resolve_machine_id(settings.machine_id, settings.dmi_dir)
    deliveries: list[Delivery] = []
    try:
        for kind in settings.exporter_type:
            try:
                deliveries.append(open_delivery(kind, settings, open_local_on_first_write=True))
            except ExporterError as exc:
                if exc.is_config:  # bad client settings: exit 2 like every settings error
                    raise ConfigError(str(exc)) from exc
                raise
        source = open_source(choice)
        try:
            with interrupt_deliveries_on_signals(deliveries) as interruption:
                result = await scan_once(
                    source,
                    deliveries,
                    cluster=settings.cluster_name,
                    node=settings.node_name,
                    machine=machine,
                    source_label=choice.label,
                    delivery_timeout=settings.delivery_timeout,
                )
            return result, interruption
        finally:
            source.close()
    finally:
        await close_deliveries(deliveries)


@app.command("export-test")
def export_test(
    exporter: ExporterOpt = None,
    db: DbOpt = None,
    cluster: ClusterOpt = None,
    node: NodeOpt = None,
) -> None:
    """Send one synthetic reading through each configured exporter and report the result.

    For operators checking credentials and reachability: it writes directly (no
    spool, no retry), so the exact failure is what you see. The reading has
    source `gpufleet-export-test` and gpu `GPUFLEET-EXPORT-TEST`, easy to delete.
    """
    settings = _settings(ScanSettings, exporter=exporter, db=db, cluster=cluster, node=node)
    results = asyncio.run(run_export_test(settings, settings.node_name))
    for kind, error in results:
        if error is None:
            sys.stdout.write(f"ok    {kind}: health check passed, wrote 1 synthetic reading\n")
        else:
            sys.stdout.write(f"FAIL  {kind}: {error}\n")
    if any(error is not None for _, error in results):
        raise typer.Exit(1)


NamespaceOpt = Annotated[
    str | None,
    typer.Option(
        "--namespace", help="Namespace of the pods [env NAMESPACE; default gpu-operator]."
    ),
]
SelectorOpt = Annotated[
    str | None,
    typer.Option(
        "--label-selector",
        help="Pods to watch [env LABEL_SELECTOR; default app=nvidia-device-plugin-daemonset].",
    ),
]
ContainerOpt = Annotated[
    str | None,
    typer.Option("--container", help="Container to exec in [env CONTAINER; default "
                 "nvidia-device-plugin]."),
]  # fmt: skip
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Pods processed at once [env WORKERS; default 16].")
]
PortOpt = Annotated[
    int | None,
    typer.Option("--server-port", help="Port of /metrics, /healthz, /readyz [env SERVER_PORT; "
                 "default 8080]."),
]  # fmt: skip


@app.command()
def controller(
    cluster: ClusterOpt = None,
    exporter: ExporterOpt = None,
    namespace: NamespaceOpt = None,
    label_selector: SelectorOpt = None,
    container: ContainerOpt = None,
    workers: WorkersOpt = None,
    server_port: PortOpt = None,
) -> None:
    """Watch the device-plugin pods and read each node's GPUs through them (gpuid mode)."""
    from gpufleet.inventory.config import ControllerSettings
    from gpufleet.inventory.service import controller_processor

    _watch_pods(
        ControllerSettings, controller_processor, cluster=cluster, exporter=exporter,
        namespace=namespace, label_selector=label_selector, container=container,
        workers=workers, server_port=server_port,
    )  # fmt: skip


@app.command()
def check(
    command: Annotated[
        str | None, typer.Option("--command", help="Shell script to run in each pod [env COMMAND].")
    ] = None,
    force_restart: Annotated[
        bool | None,
        typer.Option(
            "--force-restart/--no-force-restart",
            help="Delete a pod whose command fails [env FORCE_RESTART; default false].",
        ),
    ] = None,
    cluster: ClusterOpt = None,
    namespace: NamespaceOpt = None,
    label_selector: SelectorOpt = None,
    container: ContainerOpt = None,
    workers: WorkersOpt = None,
    server_port: PortOpt = None,
) -> None:
    """Run COMMAND in each matching ready pod and log the result (gpuid's pod monitor)."""
    from gpufleet.inventory.config import CheckSettings
    from gpufleet.inventory.service import check_processor

    _watch_pods(
        CheckSettings, check_processor, command=command, force_restart=force_restart,
        cluster=cluster, namespace=namespace, label_selector=label_selector,
        container=container, workers=workers, server_port=server_port,
    )  # fmt: skip


@app.command()
def agent(
    node: Annotated[
        str | None, typer.Option("--node", help="This node's name [env NODE_NAME; required].")
    ] = None,
    simulate: Annotated[
        str | None,
        typer.Option(
            "--simulate",
            metavar="PRESET",
            help="Read simulated GPUs instead of NVML [env SIMULATE].",
        ),
    ] = None,
    scan_interval: Annotated[
        str | None,
        typer.Option("--scan-interval", help="Time between scans [env SCAN_INTERVAL; default 1h]."),
    ] = None,
    cluster: ClusterOpt = None,
    exporter: ExporterOpt = None,
    server_port: PortOpt = None,
) -> None:
    """Node agent (DaemonSet): read this node's GPUs at start and every SCAN_INTERVAL."""
    from gpufleet.inventory.config import AgentSettings
    from gpufleet.inventory.service import run_agent

    settings = _settings(
        AgentSettings, node=node, simulate=simulate, scan_interval=scan_interval,
        cluster=cluster, exporter=exporter, server_port=server_port,
    )  # fmt: skip
    asyncio.run(run_agent(settings))


class HistoryStore(StrEnum):
    """Where ``inventory history`` asks."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"


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
    store_kind: Annotated[
        HistoryStore,
        typer.Option(
            "--from",
            help="Where to ask: the SQLite inventory (--db), or the PostgreSQL exporter's "
            "tables (the POSTGRES_* variables).",
            case_sensitive=False,
        ),
    ] = HistoryStore.SQLITE,
) -> None:
    """Answer where GPUs have been, from the SQLite inventory or from PostgreSQL."""
    questions = [q for q in (gpu, machine, node) if q is not None] + (["moved"] if moved else [])
    if len(questions) != 1:
        raise HistoryError("ask exactly one of --gpu, --machine, --node or --moved")
    store: PlacementStore
    if store_kind is HistoryStore.POSTGRES:
        if db is not None:
            raise ConfigError(
                "--db names a SQLite file; with --from postgres the POSTGRES_* variables "
                "name the database"
            )
        from gpufleet.inventory.exporters.postgres.history import PostgresHistory
        from gpufleet.inventory.exporters.postgres.settings import PostgresSettings

        store = PostgresHistory(load_settings(PostgresSettings))
    else:
        store = History(_settings(HistorySettings, db=db).sqlite_path)
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
    # Every field but the cluster identifies the placement; a narrow terminal
    # gets one record per placement rather than a cut serial or timestamp.
    columns = [Column(name, key=True) for name in ("gpu", "uuid", "machine", "node")]
    columns += [
        Column("cluster", drop=1),
        *(Column(n, key=True) for n in ("first seen", "last seen")),
    ]
    cells = [[r.gpu, r.uuid, r.machine, r.node, r.cluster, r.first_seen, r.last_seen] for r in rows]
    console = stdout_console()
    console.print(fitted_table(console, f"{title}: {len(rows)} placement(s)", columns, cells))
