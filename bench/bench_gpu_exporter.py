"""The GPU exporter on 8 GPUs x 256 processes: gpufleet vs nvitop-exporter, same simulated NVML.

What is measured, for each exporter:
  - collection: one pass over every GPU and every GPU process, NVML and /proc
    included (p50, p99, mean);
  - scrape: ``prometheus_client.generate_latest`` on the exporter's registry,
    i.e. what one ``GET /metrics`` costs. Each timed scrape follows a new
    collection, so gpufleet renders a new snapshot every time (its worst case);
    scrapes with no collection in between are printed too;
  - the number of series a scrape returns, and how many distinct PIDs its
    ``process_*`` series cover;
  - RSS: ``ru_maxrss`` and the current resident set (``/proc/self/statm``).

Targets (from the exporter issue): gpufleet's scrape p99 <= 50 ms, and its
collection at least 2x faster than nvitop-exporter's.

Why the comparison is fair:
  - Both read the same node: the ``dgx-h100`` preset of ``gpufleet.gpu.sim``
    (same seed), with the same 256 PIDs as compute processes, 32 per GPU, with
    the same memory and SM utilization. nvitop gets the simulator as its
    ``pynvml`` module (``_nvitop_sim.pynvml_facade``); NVML functions the
    simulator lacks raise NotSupported, which only saves nvitop work.
  - The PIDs are 256 real idle child processes of this script, so both
    exporters read the same real ``/proc`` entries (nvitop through psutil,
    gpufleet through its ``ProcFs``).
  - The run fails unless both exporters report every one of the 256 PIDs with
    the same GPU memory and SM utilization: they did the same job.
  - Each exporter runs in its own fresh interpreter (this script re-executed
    with ``--side``), with its own ``SimulatedNvml`` instance, one after the
    other, so neither shares a cache, a heap or the CPU with the other, and
    the RSS figures are each exporter's own (both include the simulator).
  - nvitop-exporter's collection is the body of ``PrometheusExporter.collect``
    (``update_host`` then ``update_device`` per GPU) without its sleep. It
    also exports host metrics that gpufleet does not, so the 2x target is
    checked against its GPU part alone (``update_device`` per GPU), the
    stricter of the two ratios; both are printed.

What is not equal: nvitop-exporter also exports, per process, CPU %, host
RSS, memory % and running time, which it reads through psutil on every pass,
while gpufleet keeps a process's identity per (PID, start time) and reads only
``/proc/<pid>/stat`` again. Part of the ratio is that design, part is metrics
nvitop has and gpufleet does not; nvitop's scrapes also carry more series.

Usage: python bench/bench_gpu_exporter.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from _nvitop_sim import pynvml_facade, simulated_node

HERE = Path(__file__).resolve()
PROCESSES = 256
HOSTNAME = "bench"
SCRAPE_P99_TARGET_MS = 50.0
COLLECT_RATIO_TARGET = 2.0
SIDES = ("nvitop", "gpufleet")
# Per-process families compared between the exporters: name -> (quantity, factor to base unit).
PROCESS_FAMILIES = {
    "process_gpu_memory_MiB": ("gpu memory bytes", 2**20),  # nvitop-exporter
    "process_gpu_memory": ("gpu memory bytes", 1),  # gpufleet
    "process_gpu_sm_utilization_Percentage": ("sm utilization %", 1),  # nvitop-exporter
    "process_gpu_sm_utilization": ("sm utilization %", 1),  # gpufleet
}


@dataclass(frozen=True)
class Plan:
    """``warmup`` untimed collections, then ``rounds`` of (collect, scrape), then repeat scrapes."""

    warmup: int
    rounds: int
    repeat_scrapes: int


FULL = Plan(warmup=3, rounds=60, repeat_scrapes=60)
QUICK = Plan(warmup=1, rounds=5, repeat_scrapes=5)


@dataclass
class SideResult:
    """What one exporter's subprocess measured; travels to the parent as JSON."""

    name: str
    collect_ms: list[float]
    scrape_ms: list[float]
    """Each right after a collection: gpufleet renders a new snapshot in every one."""
    repeat_scrape_ms: list[float]
    """Scrapes with no collection in between (gpufleet serves its cached render)."""
    series: int
    process_pids: int
    scrape_bytes: int
    maxrss_kib: int
    rss_kib: int
    process_values: dict[str, dict[str, float]] = field(default_factory=dict)
    """Quantity (``PROCESS_FAMILIES``) -> PID -> value in base units, from the last scrape."""
    gpu_part_ms: list[float] = field(default_factory=list)
    """nvitop only: ``update_device`` over all GPUs, without its host metrics."""
    notes: list[str] = field(default_factory=list)


# --- one exporter per subprocess ----------------------------------------------

Collect = Callable[[], "float | None"]
"""One collection; may return the time of a part of it (ms) worth reporting alone."""


def measure_nvitop(pids: Sequence[int], plan: Plan) -> SideResult:
    """nvitop-exporter's ``PrometheusExporter`` over the simulator injected as ``pynvml``."""
    facade = pynvml_facade(simulated_node(pids))
    sys.modules["pynvml"] = facade
    # Without ``_nvmlGetFunctionPointer`` nvitop calls pynvml's Python functions
    # instead of C symbols, and warns once per patch it skips; that is intended.
    logging.getLogger("nvitop.api.libnvml").addFilter(
        lambda record: "is corrupted" not in record.getMessage()
    )
    from nvitop import Device
    from nvitop_exporter.exporter import PrometheusExporter

    devices = Device.from_indices(range(Device.count()))
    registry = CollectorRegistry()
    exporter = PrometheusExporter(devices, hostname=HOSTNAME, registry=registry)

    def interval() -> float:
        # The loop body of PrometheusExporter.collect(), minus its sleep.
        exporter.update_host()
        start = time.perf_counter()
        for device in devices:
            exporter.update_device(device)
        return (time.perf_counter() - start) * 1e3

    result = _measure("nvitop-exporter", interval, registry, plan)
    if facade.missing_calls:
        calls = ", ".join(sorted(facade.missing_calls))
        result.notes.append(f"nvitop called NVML functions the simulator lacks: {calls}")
    return result


def measure_gpufleet(pids: Sequence[int], plan: Plan) -> SideResult:
    """gpufleet's ``GpuCollector`` and ``SnapshotMetrics`` over ``NvmlSource(simulator)``."""
    from gpufleet.exporter.collector import GpuCollector
    from gpufleet.exporter.metrics import SnapshotMetrics
    from gpufleet.exporter.podmap.procfs import ProcFs
    from gpufleet.gpu.nvml import NvmlSource

    collector = GpuCollector(
        NvmlSource(simulated_node(pids)), hostname=HOSTNAME, procfs=ProcFs(Path("/proc"))
    )
    registry = CollectorRegistry()
    registry.register(SnapshotMetrics(collector.latest_snapshot))
    # One loop for the whole run, as in the exporter: its worker thread is reused.
    with asyncio.Runner() as runner:

        def collect() -> None:
            runner.run(collector.collect())

        return _measure("gpufleet", collect, registry, plan)


def _measure(name: str, collect: Collect, registry: CollectorRegistry, plan: Plan) -> SideResult:
    """Time collections and scrapes, then count what the last scrape holds."""
    for _ in range(plan.warmup):
        collect()
    collect_ms, part_ms, scrape_ms, repeat_ms = [], [], [], []
    body = b""
    for _ in range(plan.rounds):
        start = time.perf_counter()
        part = collect()
        collect_ms.append((time.perf_counter() - start) * 1e3)
        if part is not None:
            part_ms.append(part)
        start = time.perf_counter()
        body = generate_latest(registry)
        scrape_ms.append((time.perf_counter() - start) * 1e3)
    for _ in range(plan.repeat_scrapes):
        start = time.perf_counter()
        generate_latest(registry)
        repeat_ms.append((time.perf_counter() - start) * 1e3)
    series = 0
    pids: set[str] = set()
    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        quantity, factor = PROCESS_FAMILIES.get(family.name, ("", 0))
        for sample in family.samples:
            series += 1
            pid = sample.labels.get("pid")
            if family.name.startswith("process_") and pid is not None:
                pids.add(pid)
                if quantity:
                    values.setdefault(quantity, {})[pid] = sample.value * factor
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return SideResult(
        name=name,
        collect_ms=collect_ms,
        scrape_ms=scrape_ms,
        repeat_scrape_ms=repeat_ms,
        series=series,
        process_pids=len(pids),
        scrape_bytes=len(body),
        maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        rss_kib=resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024,
        process_values=values,
        gpu_part_ms=part_ms,
    )


MEASURE: dict[str, Callable[[Sequence[int], Plan], SideResult]] = {
    "nvitop": measure_nvitop,
    "gpufleet": measure_gpufleet,
}


# --- the parent: processes, subprocesses, report ------------------------------


def spawn_idle_processes(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` sleeping children: real PIDs with real /proc entries for both exporters."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    ["sleep", "600"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    except BaseException:
        stop(processes)
        raise
    return processes


def stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """Kill and reap ``processes``."""
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


def run_side(side: str, pids: Sequence[int], quick: bool) -> SideResult:
    """Measure one exporter in a fresh interpreter; its RSS is then its own."""
    command = [sys.executable, str(HERE), "--side", side, "--pids", ",".join(map(str, pids))]
    if quick:
        command.append("--quick")
    done = subprocess.run(command, stdout=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {side} measurement failed (exit status {done.returncode})")
    return SideResult(**json.loads(done.stdout))


def check_same_processes(nvitop: SideResult, gpufleet: SideResult, expected: int) -> None:
    """Fail unless both exporters report the same value of each quantity for every PID."""
    for quantity in sorted({quantity for quantity, _ in PROCESS_FAMILIES.values()}):
        theirs = nvitop.process_values.get(quantity, {})
        ours = gpufleet.process_values.get(quantity, {})
        pids = theirs.keys() | ours.keys()
        differ = sorted(pid for pid in pids if theirs.get(pid) != ours.get(pid))
        if differ or len(ours) != expected:
            raise SystemExit(
                f"the exporters disagree on {quantity} for {len(differ)} PIDs "
                f"(e.g. {differ[:3]}) or miss some (nvitop {len(theirs)}, gpufleet {len(ours)})"
            )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def report(nvitop: SideResult, gpufleet: SideResult) -> None:
    """Print the table, the ratios and whether the targets are met."""
    header = (
        f"{'exporter':<22} {'collect p50':>11} {'p99':>6} {'mean':>6} {'scrape p50':>10}"
        f" {'p99':>6} {'series':>6} {'pids':>4} {'maxrss':>8} {'rss':>8}"
    )
    print(header)
    print("-" * len(header))
    for result in (nvitop, gpufleet):
        collect, scrape = result.collect_ms, result.scrape_ms
        print(
            f"{result.name:<22} {_ms(statistics.median(collect)):>11}"
            f" {percentile(collect, 99):>6.1f} {statistics.fmean(collect):>6.1f}"
            f" {_ms(statistics.median(scrape)):>10} {percentile(scrape, 99):>6.1f}"
            f" {result.series:>6} {result.process_pids:>4}"
            f" {result.maxrss_kib / 1024:>4.0f} MiB {result.rss_kib / 1024:>4.0f} MiB"
        )
    gpu_part = nvitop.gpu_part_ms
    print(
        f"{'  nvitop GPU part':<22} {_ms(statistics.median(gpu_part)):>11}"
        f" {percentile(gpu_part, 99):>6.1f} {statistics.fmean(gpu_part):>6.1f}"
        "  (update_device per GPU, no host metrics)"
    )
    print()
    for result in (nvitop, gpufleet):
        repeat = result.repeat_scrape_ms
        print(
            f"{result.name} scrape with no new collection: p50 {_ms(statistics.median(repeat))},"
            f" p99 {_ms(percentile(repeat, 99))} ({result.scrape_bytes / 1024:.0f} KiB)"
        )
    ours = statistics.fmean(gpufleet.collect_ms)
    whole_ratio = statistics.fmean(nvitop.collect_ms) / ours
    gpu_ratio = statistics.fmean(gpu_part) / ours
    scrape_p99 = percentile(gpufleet.scrape_ms, 99)
    print(f"collection mean, nvitop / gpufleet: {whole_ratio:.1f}x (nvitop's whole interval)")
    print(f"collection mean, nvitop / gpufleet: {gpu_ratio:.1f}x (nvitop's GPU part only)")
    for note in nvitop.notes + gpufleet.notes:
        print(f"note: {note}")
    print()
    print(
        f"target gpufleet scrape p99 <= {SCRAPE_P99_TARGET_MS:.0f} ms: "
        f"{_verdict(scrape_p99 <= SCRAPE_P99_TARGET_MS)} ({_ms(scrape_p99)})"
    )
    print(
        f"target gpufleet collection >= {COLLECT_RATIO_TARGET:.0f}x faster than nvitop-exporter"
        f" (vs its GPU part): {_verdict(gpu_ratio >= COLLECT_RATIO_TARGET)} ({gpu_ratio:.1f}x)"
    )


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> None:
    """Run both sides (or, with ``--side``, measure one and print it as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--pids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL

    if args.side:
        pids = [int(pid) for pid in args.pids.split(",")]
        result = MEASURE[args.side](pids, plan)
        if result.process_pids != len(pids):
            raise SystemExit(
                f"{result.name}: process series cover {result.process_pids} PIDs, "
                f"expected {len(pids)}; the comparison would be meaningless"
            )
        json.dump(asdict(result), sys.stdout)
        return

    processes = spawn_idle_processes(PROCESSES)
    try:
        pids = [process.pid for process in processes]
        print(
            f"8 simulated H100 GPUs x {PROCESSES} processes; per exporter: {plan.warmup} warm-up "
            f"collections, {plan.rounds} x (collect, scrape), {plan.repeat_scrapes} repeat scrapes"
        )
        results = {side: run_side(side, pids, args.quick) for side in SIDES}
    finally:
        stop(processes)
    check_same_processes(results["nvitop"], results["gpufleet"], len(pids))
    report(results["nvitop"], results["gpufleet"])


if __name__ == "__main__":
    main()
