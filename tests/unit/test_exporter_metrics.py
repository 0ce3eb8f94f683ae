"""SnapshotMetrics: names, units, labels and cardinality, parsed back with the real parser."""

from __future__ import annotations

import logging
import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpufleet.exporter.metrics import RenderOptions, SnapshotMetrics
from gpufleet.exporter.podmap.cgroup import CgroupRef
from gpufleet.exporter.podmap.resolver import PodIndex
from gpufleet.exporter.snapshot import DeviceState, Owner, ProcessState, Snapshot
from gpufleet.gpu.model import GpuSample

TRAIN = Owner("ml", "train-0", "main")
SERVE = Owner("web", "serve-0", "api")


def gpu(index: int, *, up: bool = True, owner: Owner | None = None) -> DeviceState:
    sample = GpuSample(
        uuid=f"GPU-{index}", gpu_utilization_percent=50 + index, memory_used_bytes=2**30,
        memory_free_bytes=3 * 2**30, temperature_celsius=40, power_usage_watts=123.5,
        ecc_corrected_total=4, ecc_uncorrected_total=0,
    )  # fmt: skip
    return DeviceState(
        str(index), f"GPU-{index}", "NVIDIA H100", up, sample if up else None, 4 * 2**30, owner,
        xid_counts=((79, 2),) if index == 1 else (),
    )  # fmt: skip


def process(pid: int, owner: Owner | None, *, memory: int = 2**20, device: int = 0) -> ProcessState:
    return ProcessState(
        str(device), f"GPU-{device}", "NVIDIA H100", pid, "root", f"python job{pid}.py", owner,
        memory, 10,
    )  # fmt: skip


def snapshot(*processes: ProcessState, devices: tuple[DeviceState, ...] | None = None) -> Snapshot:
    return Snapshot(
        hostname="node-1", taken_at=1_700_000_000.0, duration_s=0.01,
        devices=devices if devices is not None else (gpu(0), gpu(1)),
        processes=processes, errors=(("sample", 3),),
    )  # fmt: skip


def scrape(snap: Snapshot | None, options: RenderOptions | None = None) -> list[Sample]:
    registry = CollectorRegistry()
    registry.register(SnapshotMetrics(lambda: snap, options))
    text = generate_latest(registry).decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def named(samples: list[Sample], name: str) -> list[Sample]:
    return [s for s in samples if s.name == name]


def test_nothing_is_exported_before_the_first_collection() -> None:
    assert scrape(None) == []


def test_gpu_series_carry_the_seed_labels_and_base_units() -> None:
    samples = scrape(snapshot())
    (used,) = [s for s in named(samples, "gpu_memory_used") if s.labels["index"] == "0"]
    assert used.value == 2**30
    assert {k: used.labels[k] for k in ("hostname", "index", "devicename", "uuid")} == {
        "hostname": "node-1", "index": "0", "devicename": "NVIDIA H100", "uuid": "GPU-0",
    }  # fmt: skip
    (total,) = [s for s in named(samples, "gpu_memory_total") if s.labels["index"] == "1"]
    assert total.value == 4 * 2**30
    assert {s.value for s in named(samples, "gpu_power_usage")} == {123.5}


def test_unsupported_fields_have_no_series_rather_than_zero() -> None:
    samples = scrape(snapshot())
    assert named(samples, "gpu_clock_sm") == []  # None in the sample: NVML NotSupported


def test_ecc_and_xid_counters_are_labelled_by_type_and_xid() -> None:
    samples = scrape(snapshot())
    ecc = {
        (s.labels["index"], s.labels["type"]): s.value
        for s in named(samples, "gpu_ecc_errors_total")
    }
    assert ecc[("0", "corrected")] == 4
    assert ecc[("0", "uncorrected")] == 0
    xid = [
        (s.labels["index"], s.labels["xid"], s.value)
        for s in named(samples, "gpu_xid_errors_total")
    ]
    assert xid == [("1", "79", 2.0)]


def test_gpu_up_is_0_for_a_down_device_and_its_telemetry_is_left_out() -> None:
    samples = scrape(snapshot(devices=(gpu(0), gpu(1, up=False))))
    up = {s.labels["index"]: s.value for s in named(samples, "gpufleet_exporter_gpu_up")}
    assert up == {"0": 1.0, "1": 0.0}
    assert {s.labels["index"] for s in named(samples, "gpu_utilization")} == {"0"}


def test_self_metrics_report_errors_by_stage_and_the_collection_time() -> None:
    samples = scrape(snapshot())
    errors = named(samples, "gpufleet_exporter_collect_errors_total")
    assert [(s.labels["stage"], s.value) for s in errors] == [("sample", 3.0)]
    (last,) = named(samples, "gpufleet_exporter_last_collect_timestamp_seconds")
    assert last.value == 1_700_000_000.0


def test_device_owner_from_podresources_labels_gpu_series() -> None:
    samples = scrape(snapshot(devices=(gpu(0, owner=TRAIN), gpu(1))))
    owners = {
        s.labels["index"]: (s.labels["pod"], s.labels["namespace"], s.labels["container"])
        for s in named(samples, "gpu_utilization")
    }
    assert owners == {"0": ("train-0", "ml", "main"), "1": ("", "", "")}


def test_process_series_carry_pid_user_and_owner() -> None:
    samples = scrape(snapshot(process(11, TRAIN), process(12, None)))
    rows = {
        s.labels["pid"]: (s.labels["username"], s.labels["pod_name"], s.labels["container_name"])
        for s in named(samples, "process_gpu_memory")
    }
    assert rows == {"11": ("root", "train-0", "main"), "12": ("root", "", "")}
    assert named(samples, "process_info") == []  # opt-in


def test_process_info_is_opt_in_and_carries_the_command() -> None:
    samples = scrape(snapshot(process(11, TRAIN)), RenderOptions(process_info=True))
    (info,) = named(samples, "process_info")
    assert (info.labels["command"], info.value) == ("python job11.py", 1.0)


def test_without_pid_process_series_are_summed_per_container() -> None:
    options = RenderOptions(
        process_labels=("pod_name", "pod_namespace", "container_name"), process_info=True
    )
    snap = snapshot(
        process(11, TRAIN, memory=100), process(12, TRAIN, memory=50), process(13, SERVE, memory=7)
    )
    samples = scrape(snap, options)
    memory = {s.labels["pod_name"]: s.value for s in named(samples, "process_gpu_memory")}
    assert memory == {"train-0": 150.0, "serve-0": 7.0}
    assert all(
        "pid" not in s.labels and "username" not in s.labels
        for s in samples
        if s.name.startswith("process_")
    )
    sm = {s.labels["pod_name"]: s.value for s in named(samples, "process_gpu_sm_utilization")}
    assert sm == {"train-0": 20.0, "serve-0": 10.0}
    counts = sorted(s.value for s in named(samples, "process_info"))
    assert counts == [1.0, 1.0, 1.0]  # distinct commands: one each


def test_allowlisted_pod_labels_are_copied_onto_process_series() -> None:
    index = PodIndex(label_allowlist=re.compile(r"team|app\.kubernetes\.io/.*"))
    labels = {"team": "vision", "app.kubernetes.io/name": "trainer", "secret": "x"}
    uid = "00000000-0000-4000-8000-000000000001"
    status = {"name": "main", "containerID": "containerd://" + "a" * 64}
    index.upsert({
        "metadata": {"uid": uid, "namespace": "ml", "name": "train-0", "labels": labels},
        "status": {"containerStatuses": [status]},
    })  # fmt: skip
    owner = index.lookup(CgroupRef(uid, "a" * 64))
    assert owner is not None
    (sample,) = named(scrape(snapshot(process(11, owner))), "process_gpu_memory")
    assert sample.labels["label_team"] == "vision"
    assert sample.labels["label_app_kubernetes_io_name"] == "trainer"
    assert "label_secret" not in sample.labels


def test_mig_devices_are_their_own_series() -> None:
    mig = DeviceState(
        "0:2",
        "MIG-abc",
        "NVIDIA A100 MIG 1g.10gb",
        True,
        GpuSample(uuid="MIG-abc", memory_used_bytes=5),
        10,
    )
    samples = scrape(snapshot(process(11, TRAIN, device=0), devices=(gpu(0), mig)))
    assert {s.labels["index"] for s in named(samples, "gpu_memory_used")} == {"0", "0:2"}


def test_the_series_cap_leaves_out_process_series_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    snap = snapshot(*(process(100 + i, TRAIN) for i in range(50)))
    uncapped = len(scrape(snap))
    with caplog.at_level(logging.WARNING):
        samples = scrape(snap, RenderOptions(max_series=40))
    # 40 series plus the self metrics that are outside the budget (timestamp, errors, capped).
    assert len(samples) < uncapped
    assert len(named(samples, "process_gpu_memory")) < 50
    assert named(samples, "gpu_utilization")  # GPU series come first
    (capped,) = named(samples, "gpufleet_exporter_series_capped")
    assert capped.value > 0
    assert "series cap hit" in caplog.text


def test_a_snapshot_is_rendered_once_however_often_it_is_scraped() -> None:
    snap = snapshot(process(11, TRAIN))
    metrics = SnapshotMetrics(lambda: snap)
    registry = CollectorRegistry()
    registry.register(metrics)
    first, second = generate_latest(registry), generate_latest(registry)
    assert first == second
    assert metrics.renders == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"process_labels": ("pid", "uid")}, "unknown process label"),
        ({"max_series": 0}, "max_series"),
    ],
)
def test_render_options_refuse_nonsense(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RenderOptions(**options)  # type: ignore[arg-type]
