"""NvmlSource, exercised end to end through the simulated NVML library."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pynvml
import pytest

from gpufleet.gpu import sim
from gpufleet.gpu.model import FaultKind, GpuDevice, GpuProcess, MigDevice, XidEvent
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.source import GpuError, GpuLostError, GpuSource

FIXED_TIME = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

OpenSource = Callable[..., tuple[sim.SimulatedNvml, NvmlSource]]


@pytest.fixture
def open_source() -> Iterator[OpenSource]:
    """Open an NvmlSource over a simulated machine; closes every source afterwards."""
    opened: list[NvmlSource] = []

    def _open(
        fleet: str | sim.SimFleet = "dgx-h100", seed: int = 0
    ) -> tuple[sim.SimulatedNvml, NvmlSource]:
        nvml = sim.open(fleet, seed=seed)
        source = NvmlSource(nvml, clock=lambda: FIXED_TIME)
        opened.append(source)
        return nvml, source

    yield _open
    for source in opened:
        source.close()


def expected_device(fleet: sim.SimFleet, index: int) -> GpuDevice:
    """What NvmlSource must report for a simulated GPU, written from the fleet description."""
    gpu = fleet.gpus[index]
    cuda = fleet.cuda_driver_version
    return GpuDevice(
        index=index,
        uuid=gpu.uuid,
        serial=gpu.serial,
        product_name=gpu.name,
        pci_bus_id=gpu.pci_bus_id,
        architecture=gpu.architecture,
        compute_capability=gpu.compute_capability,
        board_part_number=gpu.board_part_number,
        vbios_version=gpu.vbios_version,
        memory_total_bytes=gpu.memory_total_bytes,
        driver_version=fleet.driver_version,
        cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
        mig_mode=gpu.mig_enabled if gpu.mig_capable else None,
        mig_devices=tuple(
            MigDevice(
                index=slot,
                uuid=mig.uuid,
                gpu_instance_id=mig.gpu_instance_id,
                compute_instance_id=mig.compute_instance_id,
                profile=mig.profile,
                memory_total_bytes=mig.memory_total_bytes,
            )
            for slot, mig in enumerate(gpu.mig_instances)
        ),
        module_id=gpu.module_id,
        chassis_serial=gpu.chassis_serial,
    )


# --- devices(): identity ---------------------------------------------------------


@pytest.mark.parametrize("preset", sim.PRESETS)
def test_every_identity_field_is_read_for_each_preset(open_source: OpenSource, preset: str) -> None:
    nvml, source = open_source(preset)
    expected = tuple(expected_device(nvml.fleet, i) for i in range(len(nvml.fleet.gpus)))
    assert source.devices().devices == expected


def test_nvml_source_is_a_gpu_source(open_source: OpenSource) -> None:
    _, source = open_source()
    assert isinstance(source, GpuSource)


def test_dgx_h100_reads_as_eight_hopper_gpus_with_compute_9_0(open_source: OpenSource) -> None:
    _, source = open_source("dgx-h100")
    summary = {
        (d.product_name, d.architecture, d.compute_capability) for d in source.devices().devices
    }
    assert summary == {("NVIDIA H100 80GB HBM3", "hopper", (9, 0))}


def test_cuda_driver_version_is_reported_in_dotted_form(open_source: OpenSource) -> None:
    _, source = open_source("dgx-h100")
    assert source.devices().cuda_driver_version == "12.4"


def test_driver_version_is_reported_on_the_list(open_source: OpenSource) -> None:
    _, source = open_source("dgx-h100")
    assert source.devices().driver_version == "550.54.15"


def test_pci_bus_id_is_normalised_to_eight_digit_upper_case(open_source: OpenSource) -> None:
    fleet = sim.preset("l4")
    fleet.gpus[0].pci_bus_id = "0000:3b:00.0"
    _, source = open_source(fleet)
    assert source.devices().devices[0].pci_bus_id == "00000000:3B:00.0"


def test_gb200_gpus_share_board_serials_in_pairs(open_source: OpenSource) -> None:
    _, source = open_source("gb200")
    serials = [d.serial for d in source.devices().devices]
    assert serials[0] == serials[1] != serials[2] == serials[3]


def test_gb200_gpus_report_one_chassis_and_module_ids_one_to_four(open_source: OpenSource) -> None:
    _, source = open_source("gb200")
    devices = source.devices().devices
    assert ({d.chassis_serial for d in devices}, [d.module_id for d in devices]) == (
        {sim.preset("gb200").gpus[0].chassis_serial},
        [1, 2, 3, 4],
    )


def test_hopper_without_platform_info_has_no_chassis_serial(open_source: OpenSource) -> None:
    _, source = open_source("dgx-h100")
    assert {d.chassis_serial for d in source.devices().devices} == {None}


def test_gpu_without_mig_support_has_mig_mode_none(open_source: OpenSource) -> None:
    _, source = open_source("l4")
    assert source.devices().devices[0].mig_mode is None


def test_mig_gpu_lists_its_instances_with_profiles(open_source: OpenSource) -> None:
    _, source = open_source("mig-a100")
    migs = source.devices().devices[0].mig_devices
    assert [(m.profile, m.gpu_instance_id, m.compute_instance_id) for m in migs] == [
        ("3g.40gb", 2, 0),
        ("2g.20gb", 3, 0),
        ("1g.10gb", 9, 0),
    ]


def test_empty_serial_becomes_none(open_source: OpenSource) -> None:
    fleet = sim.preset("l4")
    fleet.gpus[0].serial = ""
    _, source = open_source(fleet)
    assert source.devices().devices[0].serial is None


def test_serial_na_is_kept_as_the_driver_says_it(open_source: OpenSource) -> None:
    fleet = sim.preset("l4")
    fleet.gpus[0].serial = "N/A"
    _, source = open_source(fleet)
    assert source.devices().devices[0].serial == "N/A"


@pytest.mark.parametrize(
    ("function", "field"),
    [
        ("nvmlDeviceGetSerial", "serial"),
        ("nvmlDeviceGetArchitecture", "architecture"),
        ("nvmlDeviceGetCudaComputeCapability", "compute_capability"),
        ("nvmlDeviceGetBoardPartNumber", "board_part_number"),
        ("nvmlDeviceGetVbiosVersion", "vbios_version"),
        ("nvmlDeviceGetMemoryInfo", "memory_total_bytes"),
        ("nvmlDeviceGetMigMode", "mig_mode"),
        ("nvmlDeviceGetModuleId", "module_id"),
        ("nvmlDeviceGetPlatformInfo", "chassis_serial"),
    ],
)
def test_not_supported_identity_field_becomes_none(
    open_source: OpenSource, function: str, field: str
) -> None:
    nvml, source = open_source("gb200")
    nvml.set_unsupported(1, function)
    assert getattr(source.devices().devices[1], field) is None


def test_function_missing_from_an_old_driver_becomes_none(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_error(0, "nvmlDeviceGetModuleId", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    assert source.devices().devices[0].module_id is None


def test_not_supported_field_does_not_make_the_gpu_a_fault(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_unsupported(4, "nvmlDeviceGetSerial", "nvmlDeviceGetVbiosVersion")
    assert source.devices().faults == ()


# --- devices(): faults -------------------------------------------------------------


def test_lost_gpu_does_not_hide_the_others(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_lost(3)
    assert [d.index for d in source.devices().devices] == [0, 1, 2, 4, 5, 6, 7]


def test_lost_gpu_is_reported_as_a_lost_fault_with_its_index(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_lost(3)
    assert [(f.index, f.kind) for f in source.devices().faults] == [(3, FaultKind.LOST)]


def test_unexpected_nvml_error_is_an_error_fault_naming_the_call(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_error(2, "nvmlDeviceGetSerial", pynvml.NVML_ERROR_UNKNOWN)
    fault = source.devices().faults[0]
    assert (fault.index, fault.kind, "nvmlDeviceGetSerial" in fault.message) == (
        2,
        FaultKind.ERROR,
        True,
    )


def test_error_fault_still_names_the_gpu_by_uuid_and_bus_id(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_error(2, "nvmlDeviceGetName", pynvml.NVML_ERROR_UNKNOWN)
    fault = source.devices().faults[0]
    assert (fault.uuid, fault.pci_bus_id) == (nvml.fleet.gpus[2].uuid, "00000000:3A:00.0")


def test_gpu_lost_during_mig_enumeration_is_a_lost_fault(open_source: OpenSource) -> None:
    nvml, source = open_source("mig-a100")
    nvml.set_error(0, "nvmlDeviceGetMigDeviceHandleByIndex", pynvml.NVML_ERROR_GPU_IS_LOST)
    assert [f.kind for f in source.devices().faults] == [FaultKind.LOST]


# --- sample() ------------------------------------------------------------------------


def test_sample_converts_units(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    gpu = nvml.gpu(0)
    gpu.power_usage_milliwatts, gpu.power_limit_milliwatts = 312_500, 700_000
    sample = source.sample(gpu.uuid)
    assert (sample.power_usage_watts, sample.power_limit_watts) == (312.5, 700.0)


def test_sample_reads_every_telemetry_field(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    gpu = nvml.gpu(1)
    gpu.utilization_gpu_percent, gpu.utilization_memory_percent = 87, 41
    gpu.memory_used_bytes = 10 * 2**30
    gpu.temperature_celsius = 64
    gpu.clock_sm_mhz, gpu.clock_memory_mhz = 1980, 2619
    gpu.ecc_corrected_errors, gpu.ecc_uncorrected_errors = 12, 1
    gpu.remapped_rows_failure = True
    sample = source.sample(gpu.uuid)
    assert (
        sample.gpu_utilization_percent,
        sample.memory_utilization_percent,
        sample.memory_used_bytes,
        sample.memory_free_bytes,
        sample.temperature_celsius,
        sample.clock_sm_mhz,
        sample.clock_memory_mhz,
        sample.ecc_corrected_total,
        sample.ecc_uncorrected_total,
        sample.retired_pages_pending,
        sample.remapped_rows_failure,
    ) == (87, 41, 10 * 2**30, 85520809984 - 10 * 2**30, 64, 1980, 2619, 12, 1, None, True)


def test_retired_pages_pending_is_read_where_supported(open_source: OpenSource) -> None:
    nvml, source = open_source("l4")
    nvml.gpu(0).retired_pages_pending = True
    assert source.sample(nvml.gpu(0).uuid).retired_pages_pending is True


@pytest.mark.parametrize(
    ("function", "field"),
    [
        ("nvmlDeviceGetUtilizationRates", "gpu_utilization_percent"),
        ("nvmlDeviceGetMemoryInfo", "memory_used_bytes"),
        ("nvmlDeviceGetTemperature", "temperature_celsius"),
        ("nvmlDeviceGetPowerUsage", "power_usage_watts"),
        ("nvmlDeviceGetEnforcedPowerLimit", "power_limit_watts"),
        ("nvmlDeviceGetClockInfo", "clock_sm_mhz"),
        ("nvmlDeviceGetTotalEccErrors", "ecc_corrected_total"),
        ("nvmlDeviceGetRemappedRows", "remapped_rows_failure"),
    ],
)
def test_not_supported_telemetry_becomes_none(
    open_source: OpenSource, function: str, field: str
) -> None:
    nvml, source = open_source("dgx-a100")
    nvml.set_unsupported(0, function)
    assert getattr(source.sample(nvml.gpu(0).uuid), field) is None


def test_gpu_utilization_is_none_in_mig_mode(open_source: OpenSource) -> None:
    nvml, source = open_source("mig-a100")
    assert source.sample(nvml.gpu(0).uuid).gpu_utilization_percent is None


def test_sample_of_a_lost_gpu_raises_gpu_lost_error(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_lost(3)
    with pytest.raises(GpuLostError):
        source.sample(nvml.gpu(3).uuid)


def test_lost_gpu_does_not_stop_sampling_the_others(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_lost(3)
    assert source.sample(nvml.gpu(4).uuid).uuid == nvml.gpu(4).uuid


def test_gpu_lost_mid_sample_raises_gpu_lost_error(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_error(0, "nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_GPU_IS_LOST)
    with pytest.raises(GpuLostError):
        source.sample(nvml.gpu(0).uuid)


def test_unexpected_error_in_sample_raises_gpu_error_naming_the_call(
    open_source: OpenSource,
) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_error(0, "nvmlDeviceGetTemperature", pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(GpuError, match="nvmlDeviceGetTemperature"):
        source.sample(nvml.gpu(0).uuid)


def test_sample_of_an_unknown_uuid_raises_gpu_error(open_source: OpenSource) -> None:
    _, source = open_source("l4")
    with pytest.raises(GpuError, match="no such GPU"):
        source.sample("GPU-00000000-0000-0000-0000-000000000000")


# --- processes() ---------------------------------------------------------------------


def test_processes_report_memory_and_sm_utilization(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    uuid = nvml.gpu(2).uuid
    nvml.add_process(2, 4242, used_memory_bytes=3 * 2**30, sm_util_percent=55)
    assert source.processes(uuid) == (
        GpuProcess(pid=4242, gpu_uuid=uuid, used_memory_bytes=3 * 2**30, sm_utilization_percent=55),
    )


def test_process_without_utilization_sample_has_sm_utilization_none(
    open_source: OpenSource,
) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.add_process(0, 100, used_memory_bytes=2**20, sm_util_percent=30)
    nvml.add_process(0, 200, used_memory_bytes=2**20)
    utils = {p.pid: p.sm_utilization_percent for p in source.processes(nvml.gpu(0).uuid)}
    assert utils == {100: 30, 200: None}


def test_process_utilization_not_supported_leaves_memory_readable(open_source: OpenSource) -> None:
    nvml, source = open_source("l4")
    nvml.set_unsupported(0, "nvmlDeviceGetProcessUtilization")
    nvml.add_process(0, 7, used_memory_bytes=512 * 2**20, sm_util_percent=90)
    process = source.processes(nvml.gpu(0).uuid)[0]
    assert (process.used_memory_bytes, process.sm_utilization_percent) == (512 * 2**20, None)


def test_removed_process_is_no_longer_listed(open_source: OpenSource) -> None:
    nvml, source = open_source("l4")
    nvml.add_process(0, 7, used_memory_bytes=1)
    nvml.remove_process(0, 7)
    assert source.processes(nvml.gpu(0).uuid) == ()


def test_process_on_a_mig_instance_carries_the_mig_uuid(open_source: OpenSource) -> None:
    nvml, source = open_source("mig-a100")
    gpu = nvml.gpu(0)
    nvml.add_process(0, 900, used_memory_bytes=4 * 2**30, mig_index=1)
    assert source.processes(gpu.uuid) == (
        GpuProcess(
            pid=900,
            gpu_uuid=gpu.uuid,
            used_memory_bytes=4 * 2**30,
            sm_utilization_percent=None,
            mig_uuid=gpu.mig_instances[1].uuid,
        ),
    )


def test_processes_of_a_lost_gpu_raise_gpu_lost_error(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_lost(1)
    with pytest.raises(GpuLostError):
        source.processes(nvml.gpu(1).uuid)


# --- xid_events() --------------------------------------------------------------------


def test_injected_xid_is_received_with_gpu_uuid_and_xid(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    stream = source.xid_events()
    nvml.inject_xid(5, 79)
    assert stream.wait(timeout_s=1) == XidEvent(
        gpu_uuid=nvml.gpu(5).uuid, xid=79, timestamp=FIXED_TIME
    )
    stream.close()


def test_wait_without_events_returns_none_after_the_timeout(open_source: OpenSource) -> None:
    _, source = open_source("dgx-h100")
    stream = source.xid_events()
    assert stream.wait(timeout_s=0) is None
    stream.close()


def test_gpu_without_event_support_is_skipped_and_not_delivered(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_unsupported(6, "nvmlDeviceRegisterEvents")
    stream = source.xid_events()
    nvml.inject_xid(6, 48)
    assert stream.wait(timeout_s=0) is None
    stream.close()


def test_lost_gpu_does_not_prevent_xid_registration_on_the_others(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    nvml.set_lost(0)
    stream = source.xid_events()
    assert len(stream.registered_uuids) == 7
    stream.close()


def test_xid_from_a_gpu_lost_after_registration_still_names_it(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    stream = source.xid_events()
    nvml.set_lost(2)
    nvml.inject_xid(2, 79)
    event = stream.wait(timeout_s=1)
    assert (event.gpu_uuid if event else None) == nvml.gpu(2).uuid
    stream.close()


def test_closed_stream_no_longer_receives_events(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    stream = source.xid_events()
    stream.close()
    assert nvml.inject_xid(0, 13) == 0


# --- lifecycle -------------------------------------------------------------------------


def test_close_shuts_nvml_down(open_source: OpenSource) -> None:
    nvml, source = open_source("l4")
    source.close()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()


def test_real_nvml_without_a_driver_raises_a_clear_gpu_error() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present on this machine")
    with pytest.raises(GpuError, match=r"NVML library|driver"):
        NvmlSource.real()


@pytest.mark.gpu
def test_real_nvml_enumerates_every_gpu_of_this_machine() -> None:
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded) as exc:
        pytest.skip(f"no NVIDIA driver here: {exc}")
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    with NvmlSource.real() as source:
        listed = source.devices()
    assert len(listed.devices) + len(listed.faults) == count


def test_wait_wakes_up_when_another_thread_injects(open_source: OpenSource) -> None:
    nvml, source = open_source("dgx-h100")
    stream = source.xid_events()
    injector = threading.Thread(target=nvml.inject_xid, args=(7, 63))
    injector.start()
    event = stream.wait(timeout_s=30)
    injector.join()
    assert (event.xid if event else None) == 63
    stream.close()
