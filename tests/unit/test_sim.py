"""The simulated NVML library: pynvml's surface, presets, fleet files and injection."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from gpufleet.gpu import sim
from gpufleet.gpu.source import GpuError

DATA = Path(__file__).parent.parent / "data" / "fleets"
UUID_RE = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MIG_UUID_RE = re.compile(r"^MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
BUS_ID_RE = re.compile(r"^[0-9A-F]{8}:[0-9A-F]{2}:[0-9A-F]{2}\.[0-9A-F]$")


@pytest.fixture
def h100() -> Iterator[sim.SimulatedNvml]:
    nvml = sim.open("dgx-h100")
    nvml.nvmlInit()
    yield nvml
    nvml.nvmlShutdown()


@pytest.fixture
def mig() -> Iterator[sim.SimulatedNvml]:
    nvml = sim.open("mig-a100")
    nvml.nvmlInit()
    yield nvml
    nvml.nvmlShutdown()


# --- library lifecycle and errors ------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda n: n.nvmlDeviceGetCount(),
        lambda n: n.nvmlSystemGetDriverVersion(),
        lambda n: n.nvmlDeviceGetHandleByIndex(0),
        lambda n: n.nvmlEventSetCreate(),
    ],
)
def test_calls_before_nvml_init_raise_uninitialized(call: object) -> None:
    nvml = sim.open("l4")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        call(nvml)  # type: ignore[operator]


def test_handle_calls_after_shutdown_raise_uninitialized(h100: sim.SimulatedNvml) -> None:
    handle = h100.nvmlDeviceGetHandleByIndex(0)
    h100.nvmlInit()
    h100.nvmlShutdown()
    h100.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        h100.nvmlDeviceGetUUID(handle)
    h100.nvmlInit()  # the fixture shuts down once more


def test_not_supported_is_pynvmls_own_error_class(h100: sim.SimulatedNvml) -> None:
    h100.set_unsupported(0, "nvmlDeviceGetSerial")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        h100.nvmlDeviceGetSerial(h100.nvmlDeviceGetHandleByIndex(0))


def test_pynvml_constants_are_exposed_like_on_the_module() -> None:
    nvml = sim.open("l4")
    assert (nvml.NVML_CLOCK_SM, nvml.nvmlEventTypeXidCriticalError, nvml.NVMLError) == (  # type: ignore[attr-defined]
        pynvml.NVML_CLOCK_SM,
        pynvml.nvmlEventTypeXidCriticalError,
        pynvml.NVMLError,
    )


def test_handle_from_another_library_is_an_invalid_argument(h100: sim.SimulatedNvml) -> None:
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        h100.nvmlDeviceGetUUID(object())


# --- return shapes match pynvml --------------------------------------------------------


def test_handles_are_real_nvml_device_pointers(h100: sim.SimulatedNvml) -> None:
    assert isinstance(h100.nvmlDeviceGetHandleByIndex(0), pynvml.c_nvmlDevice_t)


def test_memory_info_is_the_real_ctypes_struct(h100: sim.SimulatedNvml) -> None:
    memory = h100.nvmlDeviceGetMemoryInfo(h100.nvmlDeviceGetHandleByIndex(0))
    assert isinstance(memory, pynvml.c_nvmlMemory_t)


def test_versioned_memory_info_is_the_v2_struct(h100: sim.SimulatedNvml) -> None:
    handle = h100.nvmlDeviceGetHandleByIndex(0)
    memory = h100.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    assert isinstance(memory, pynvml.c_nvmlMemory_v2_t)


def test_pci_info_is_the_real_struct_with_a_str_bus_id(h100: sim.SimulatedNvml) -> None:
    info = h100.nvmlDeviceGetPciInfo(h100.nvmlDeviceGetHandleByIndex(0))
    assert (type(info), info.busId, info.busIdLegacy) == (
        pynvml.nvmlPciInfo_t,
        "00000000:18:00.0",
        "0000:18:00.0",
    )


def test_scalar_returns_have_pynvml_types(h100: sim.SimulatedNvml) -> None:
    handle = h100.nvmlDeviceGetHandleByIndex(0)
    assert (
        h100.nvmlSystemGetCudaDriverVersion(),
        h100.nvmlDeviceGetCudaComputeCapability(handle),
        h100.nvmlDeviceGetMigMode(handle),
        h100.nvmlDeviceGetArchitecture(handle),
        h100.nvmlDeviceGetRemappedRows(handle),
    ) == (12040, (9, 0), [0, 0], pynvml.NVML_DEVICE_ARCH_HOPPER, (0, 0, 0, 0))


def test_utilization_is_the_real_ctypes_struct(h100: sim.SimulatedNvml) -> None:
    rates = h100.nvmlDeviceGetUtilizationRates(h100.nvmlDeviceGetHandleByIndex(0))
    assert isinstance(rates, pynvml.c_nvmlUtilization_t)


def test_processes_are_pynvml_friendly_objects(h100: sim.SimulatedNvml) -> None:
    h100.add_process(0, 31, used_memory_bytes=2**30)
    (process,) = h100.nvmlDeviceGetComputeRunningProcesses(h100.nvmlDeviceGetHandleByIndex(0))
    assert (type(process), process.pid, process.usedGpuMemory, process.gpuInstanceId) == (
        pynvml.nvmlFriendlyObject,
        31,
        2**30,
        0xFFFFFFFF,
    )


def test_unknown_process_memory_is_none_as_in_pynvml(h100: sim.SimulatedNvml) -> None:
    h100.add_process(0, 31)
    (process,) = h100.nvmlDeviceGetComputeRunningProcesses(h100.nvmlDeviceGetHandleByIndex(0))
    assert process.usedGpuMemory is None


def test_process_utilization_samples_are_the_real_struct(h100: sim.SimulatedNvml) -> None:
    h100.add_process(0, 31, sm_util_percent=66)
    (sample,) = h100.nvmlDeviceGetProcessUtilization(h100.nvmlDeviceGetHandleByIndex(0), 0)
    assert (type(sample), sample.pid, sample.smUtil) == (
        pynvml.c_nvmlProcessUtilizationSample_t,
        31,
        66,
    )


def test_process_utilization_without_samples_raises_not_found(h100: sim.SimulatedNvml) -> None:
    with pytest.raises(pynvml.NVMLError_NotFound):
        h100.nvmlDeviceGetProcessUtilization(h100.nvmlDeviceGetHandleByIndex(0), 0)


def test_platform_info_fills_the_struct_passed_by_reference() -> None:
    nvml = sim.open("gb200")
    nvml.nvmlInit()
    info = pynvml.c_nvmlPlatformInfo_v2_t()
    nvml.nvmlDeviceGetPlatformInfo(nvml.nvmlDeviceGetHandleByIndex(2), ctypes.byref(info))
    assert (info.chassisSerialNumber, ord(info.moduleId)) == (nvml.gpu(2).chassis_serial, 3)


def test_platform_info_is_not_supported_before_blackwell(h100: sim.SimulatedNvml) -> None:
    info = pynvml.c_nvmlPlatformInfo_v2_t()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        h100.nvmlDeviceGetPlatformInfo(h100.nvmlDeviceGetHandleByIndex(0), ctypes.byref(info))


def test_event_data_is_the_real_struct_pointing_at_the_device(h100: sim.SimulatedNvml) -> None:
    event_set = h100.nvmlEventSetCreate()
    handle = h100.nvmlDeviceGetHandleByIndex(4)
    h100.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
    h100.inject_xid(4, 94)
    data = h100.nvmlEventSetWait(event_set, 1000)
    assert (type(data), h100.nvmlDeviceGetUUID(data.device), data.eventData) == (
        pynvml.c_nvmlEventData_t,
        h100.gpu(4).uuid,
        94,
    )


# --- handles, lost GPUs and events ---------------------------------------------------------


def test_lost_gpu_still_gets_a_handle_by_index(h100: sim.SimulatedNvml) -> None:
    h100.set_lost(3)
    assert isinstance(h100.nvmlDeviceGetHandleByIndex(3), pynvml.c_nvmlDevice_t)


def test_every_call_on_a_lost_gpu_raises_gpu_is_lost(h100: sim.SimulatedNvml) -> None:
    h100.set_lost(3)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        h100.nvmlDeviceGetUUID(h100.nvmlDeviceGetHandleByIndex(3))


def test_handle_by_uuid_finds_the_same_gpu(h100: sim.SimulatedNvml) -> None:
    handle = h100.nvmlDeviceGetHandleByUUID(h100.gpu(6).uuid)
    assert h100.nvmlDeviceGetIndex(handle) == 6


def test_handle_by_unknown_uuid_raises_not_found(h100: sim.SimulatedNvml) -> None:
    with pytest.raises(pynvml.NVMLError_NotFound):
        h100.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")


def test_wait_on_an_empty_event_set_raises_timeout(h100: sim.SimulatedNvml) -> None:
    with pytest.raises(pynvml.NVMLError_Timeout):
        h100.nvmlEventSetWait(h100.nvmlEventSetCreate(), 0)


def test_xid_reaches_every_event_set_that_registered_the_gpu(h100: sim.SimulatedNvml) -> None:
    handle = h100.nvmlDeviceGetHandleByIndex(1)
    for _ in range(2):
        h100.nvmlDeviceRegisterEvents(
            handle, pynvml.nvmlEventTypeXidCriticalError, h100.nvmlEventSetCreate()
        )
    assert h100.inject_xid(1, 31) == 2


def test_xid_is_not_delivered_for_other_event_types(h100: sim.SimulatedNvml) -> None:
    h100.nvmlDeviceRegisterEvents(
        h100.nvmlDeviceGetHandleByIndex(1), pynvml.nvmlEventTypePState, h100.nvmlEventSetCreate()
    )
    assert h100.inject_xid(1, 31) == 0


def test_xid_is_not_delivered_for_other_gpus(h100: sim.SimulatedNvml) -> None:
    h100.nvmlDeviceRegisterEvents(
        h100.nvmlDeviceGetHandleByIndex(1),
        pynvml.nvmlEventTypeXidCriticalError,
        h100.nvmlEventSetCreate(),
    )
    assert h100.inject_xid(2, 31) == 0


def test_injected_error_code_is_raised_by_the_named_function(h100: sim.SimulatedNvml) -> None:
    h100.set_error(0, "nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        h100.nvmlDeviceGetPowerUsage(h100.nvmlDeviceGetHandleByIndex(0))


def test_unsupported_names_must_be_nvml_functions(h100: sim.SimulatedNvml) -> None:
    with pytest.raises(sim.SimError, match="nvmlDeviceGetSerail"):
        h100.set_unsupported(0, "nvmlDeviceGetSerail")


def test_removing_an_unknown_process_raises(h100: sim.SimulatedNvml) -> None:
    with pytest.raises(sim.SimError):
        h100.remove_process(0, 1234)


# --- MIG -------------------------------------------------------------------------------------


def test_mig_device_handle_is_recognised(mig: sim.SimulatedNvml) -> None:
    parent = mig.nvmlDeviceGetHandleByIndex(0)
    handle = mig.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    assert (
        bool(mig.nvmlDeviceIsMigDeviceHandle(handle)),
        bool(mig.nvmlDeviceIsMigDeviceHandle(parent)),
    ) == (
        True,
        False,
    )


def test_mig_device_leads_back_to_its_parent(mig: sim.SimulatedNvml) -> None:
    parent = mig.nvmlDeviceGetHandleByIndex(0)
    handle = mig.nvmlDeviceGetMigDeviceHandleByIndex(parent, 2)
    back = mig.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    assert mig.nvmlDeviceGetUUID(back) == mig.gpu(0).uuid


def test_mig_device_reports_its_ids_uuid_name_and_memory(mig: sim.SimulatedNvml) -> None:
    handle = mig.nvmlDeviceGetMigDeviceHandleByIndex(mig.nvmlDeviceGetHandleByIndex(0), 1)
    assert (
        mig.nvmlDeviceGetGpuInstanceId(handle),
        mig.nvmlDeviceGetComputeInstanceId(handle),
        mig.nvmlDeviceGetUUID(handle),
        mig.nvmlDeviceGetName(handle),
        mig.nvmlDeviceGetMemoryInfo(handle).total,
    ) == (
        3,
        0,
        mig.gpu(0).mig_instances[1].uuid,
        "NVIDIA A100-SXM4-80GB MIG 2g.20gb",
        19968 * 2**20,
    )


def test_empty_mig_slot_raises_not_found(mig: sim.SimulatedNvml) -> None:
    parent = mig.nvmlDeviceGetHandleByIndex(0)
    assert mig.nvmlDeviceGetMaxMigDeviceCount(parent) == 7
    with pytest.raises(pynvml.NVMLError_NotFound):
        mig.nvmlDeviceGetMigDeviceHandleByIndex(parent, 3)


def test_mig_uuid_resolves_to_a_mig_handle(mig: sim.SimulatedNvml) -> None:
    handle = mig.nvmlDeviceGetHandleByUUID(mig.gpu(0).mig_instances[0].uuid)
    assert bool(mig.nvmlDeviceIsMigDeviceHandle(handle))


def test_mig_handle_lists_only_its_own_processes(mig: sim.SimulatedNvml) -> None:
    mig.add_process(0, 1, mig_index=0)
    mig.add_process(0, 2, mig_index=2)
    handle = mig.nvmlDeviceGetMigDeviceHandleByIndex(mig.nvmlDeviceGetHandleByIndex(0), 2)
    assert [p.pid for p in mig.nvmlDeviceGetComputeRunningProcesses(handle)] == [2]


def test_gpu_without_mig_support_raises_not_supported_for_mig_mode() -> None:
    nvml = sim.open("l4")
    nvml.nvmlInit()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetMigMode(nvml.nvmlDeviceGetHandleByIndex(0))


# --- presets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "product"),
    [
        ("dgx-h100", 8, "NVIDIA H100 80GB HBM3"),
        ("dgx-a100", 8, "NVIDIA A100-SXM4-80GB"),
        ("gb200", 4, "NVIDIA GB200"),
        ("l4", 1, "NVIDIA L4"),
        ("mig-a100", 1, "NVIDIA A100-SXM4-80GB"),
    ],
)
def test_preset_has_the_gpus_of_its_machine(name: str, count: int, product: str) -> None:
    assert {gpu.name for gpu in sim.preset(name).gpus} == {product}
    assert len(sim.preset(name).gpus) == count


@pytest.mark.parametrize("name", sim.PRESETS)
def test_preset_identities_have_realistic_formats(name: str) -> None:
    gpus = sim.preset(name).gpus
    assert all(
        UUID_RE.match(g.uuid)
        and BUS_ID_RE.match(g.pci_bus_id)
        and re.fullmatch(r"\d{13}", g.serial or "")
        for g in gpus
    )


def test_dgx_h100_gpus_have_distinct_identities() -> None:
    gpus = sim.preset("dgx-h100").gpus
    assert [len({getattr(g, f) for g in gpus}) for f in ("uuid", "serial", "pci_bus_id")] == [
        8,
        8,
        8,
    ]


def test_dgx_h100_uses_the_real_machines_bus_ids_and_memory() -> None:
    gpu = sim.preset("dgx-h100").gpus[0]
    assert (gpu.pci_bus_id, gpu.memory_total_bytes) == ("00000000:18:00.0", 85520809984)


def test_gb200_boards_carry_two_gpus_each_in_one_chassis() -> None:
    gpus = sim.preset("gb200").gpus
    assert (
        len({g.serial for g in gpus}),
        len({g.chassis_serial for g in gpus}),
        len({g.uuid for g in gpus}),
    ) == (
        2,
        1,
        4,
    )


def test_mig_a100_instances_have_mig_uuids() -> None:
    instances = sim.preset("mig-a100").gpus[0].mig_instances
    assert all(MIG_UUID_RE.match(m.uuid) for m in instances)


def test_same_seed_gives_the_same_machine() -> None:
    assert sim.preset("dgx-a100", seed=5) == sim.preset("dgx-a100", seed=5)


def test_another_seed_gives_another_machine() -> None:
    first, second = sim.preset("dgx-a100", seed=1), sim.preset("dgx-a100", seed=2)
    assert {g.uuid for g in first.gpus}.isdisjoint(g.uuid for g in second.gpus)


def test_unknown_preset_is_a_gpu_error() -> None:
    with pytest.raises(GpuError, match="known: dgx-h100"):
        sim.preset("dgx-z9000")


# --- fleet files -------------------------------------------------------------------------------


def test_fleet_file_overrides_a_preset() -> None:
    fleet = sim.load_fleet(DATA / "h100_overrides.yaml")
    assert (fleet.gpus[3].lost, fleet.gpus[5].temperature_celsius, fleet.gpus[5].unsupported) == (
        True,
        91,
        {"nvmlDeviceGetSerial"},
    )


def test_fleet_file_keeps_the_preset_identities_for_its_seed() -> None:
    fleet = sim.load_fleet(DATA / "h100_overrides.yaml")
    assert [g.uuid for g in fleet.gpus] == [g.uuid for g in sim.preset("dgx-h100", seed=7).gpus]


def test_fleet_file_can_list_every_gpu() -> None:
    fleet = sim.load_fleet(DATA / "two_l4.yaml")
    assert [(g.name, g.compute_capability, g.mig_capable) for g in fleet.gpus] == [
        ("NVIDIA L4", (8, 9), False),
        ("NVIDIA L4", (8, 9), False),
    ]


def test_open_accepts_a_fleet_file_path() -> None:
    nvml = sim.open(DATA / "two_l4.yaml")
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"preset": "dgx-h100", "gpus": {2: {"temprature_celsius": 3}}},
            "gpus.2.temprature_celsius: unknown field",
        ),
        (
            {"preset": "dgx-h100", "gpus": {2: {"temperature_celsius": "hot"}}},
            "gpus.2.temperature_celsius",
        ),
        ({"preset": "dgx-h100", "gpus": {8: {"lost": True}}}, "gpus.8: no GPU with that index"),
        ({"preset": "dgx-x"}, "preset: unknown preset 'dgx-x'"),
        ({"preset": "l4", "seed": "one"}, "seed: must be an integer"),
        (
            {"preset": "l4", "gpus": {0: {"unsupported": ["getSerial"]}}},
            "gpus.0: not NVML functions",
        ),
        (
            {"driver_version": "1", "cuda_driver_version": 1, "gpus": [{"name": "x"}]},
            "gpus.0.uuid: Field required",
        ),
        (
            {"driver_version": "1", "cuda_driver_version": 1, "gpus": [], "seed": 1},
            "seed: only allowed",
        ),
        ([1, 2], "a fleet file must be a mapping"),
    ],
)
def test_invalid_fleet_names_the_origin_and_the_field(data: object, message: str) -> None:
    with pytest.raises(sim.FleetFileError, match=f"^fleet.yaml: {re.escape(message)}"):
        sim.fleet_from_dict(data, origin="fleet.yaml")


def test_invalid_fleet_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("preset: l4\ngpus:\n  0: {architecture: hopperr}\n")
    with pytest.raises(sim.FleetFileError, match=r"broken\.yaml: gpus\.0\.architecture"):
        sim.load_fleet(path)


def test_fleet_file_that_is_not_yaml_is_a_fleet_file_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("preset: [l4\n")
    with pytest.raises(sim.FleetFileError, match="not valid YAML"):
        sim.load_fleet(path)


def test_missing_fleet_file_is_a_fleet_file_error(tmp_path: Path) -> None:
    with pytest.raises(sim.FleetFileError, match="cannot read"):
        sim.load_fleet(tmp_path / "absent.yaml")
