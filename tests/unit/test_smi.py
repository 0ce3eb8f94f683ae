"""nvidia-smi XML and CSV: parsing real documents, writing them, and the round trip."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import pytest

from gpufleet.gpu.model import (
    DeviceList,
    FaultKind,
    GpuDevice,
    GpuFault,
    GpuProcess,
    GpuSample,
    MigDevice,
)
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.sim import PRESETS, SimulatedNvml
from gpufleet.gpu.sim import open as open_sim
from gpufleet.gpu.smi import (
    DEFAULT_QUERY_FIELDS,
    MIB,
    SmiParseError,
    SmiReport,
    SmiXmlSource,
    parse_smi_csv,
    parse_smi_xml,
    smi_query_command,
    smi_stderr_lines,
    smi_visible,
    write_smi_xml,
)
from gpufleet.gpu.snapshot import take_snapshot
from gpufleet.gpu.source import GpuError, GpuSource

DATA = Path(__file__).parent.parent / "data" / "smi"
MOMENT = datetime(2026, 3, 2, 10, 4, 5)


def parse_file(name: str) -> SmiReport:
    return parse_smi_xml((DATA / name).read_bytes(), origin=name)


def minimal_doc(gpu_body: str, *, head: str = "") -> str:
    return (
        '<?xml version="1.0" ?>\n<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">\n'
        f'<nvidia_smi_log>{head}<gpu id="00000000:18:00.0">{gpu_body}</gpu></nvidia_smi_log>'
    )


UUID_BODY = "<uuid>GPU-0</uuid><product_name>NVIDIA L4</product_name>"


# --- real documents --------------------------------------------------------------


def test_gpu_index_is_position_in_document_not_minor_number() -> None:
    report = parse_file("h100_na_serial.xml")
    assert [d.index for d in report.devices.devices] == [0, 1]


def test_na_serial_reads_as_none() -> None:
    report = parse_file("h100_na_serial.xml")
    assert [d.serial for d in report.devices.devices] == [None, "1652922019281"]


def test_h100_identity_is_read_in_full() -> None:
    report = parse_file("h100_na_serial.xml")
    assert report.devices.devices[0] == GpuDevice(
        index=0,
        uuid="GPU-6a6b3e1c-8a4e-2f7d-91c3-5b0e7d2a4f18",
        serial=None,
        product_name="NVIDIA H100 80GB HBM3",
        pci_bus_id="00000000:18:00.0",
        architecture="hopper",
        compute_capability=None,
        board_part_number="692-2G520-0200-000",
        vbios_version="96.00.89.00.01",
        memory_total_bytes=81559 * MIB,
        driver_version="550.127.05",
        cuda_driver_version="12.4",
        mig_mode=False,
        mig_devices=(),
        module_id=2,
        chassis_serial=None,
    )


def test_h100_telemetry_is_read_with_units_stripped() -> None:
    report = parse_file("h100_na_serial.xml")
    assert report.samples[0] == GpuSample(
        uuid="GPU-6a6b3e1c-8a4e-2f7d-91c3-5b0e7d2a4f18",
        gpu_utilization_percent=0,
        memory_utilization_percent=0,
        memory_used_bytes=1 * MIB,
        memory_free_bytes=81007 * MIB,
        temperature_celsius=33,
        power_usage_watts=69.89,
        power_limit_watts=700.0,
        clock_sm_mhz=1980,
        clock_memory_mhz=2619,
        ecc_corrected_total=2,
        ecc_uncorrected_total=0,
        retired_pages_pending=None,
        remapped_rows_failure=False,
    )


def test_document_header_is_kept_on_the_report() -> None:
    report = parse_file("h100_na_serial.xml")
    assert (report.timestamp, report.driver_version, report.cuda_version, report.attached_gpus) == (
        "Tue Feb 11 09:14:52 2025",
        "550.127.05",
        "12.4",
        2,
    )


def test_compute_process_is_attributed_to_its_gpu() -> None:
    report = parse_file("h100_na_serial.xml")
    assert report.processes == (
        GpuProcess(
            pid=48211,
            gpu_uuid="GPU-0d3f51f2-7c1b-94a0-6e25-c8b4a91f0e77",
            used_memory_bytes=40952 * MIB,
        ),
    )


def test_older_driver_without_platform_info_has_no_chassis_or_module() -> None:
    device = parse_file("no_platforminfo.xml").devices.devices[0]
    assert (device.chassis_serial, device.module_id) == (None, None)


def test_old_power_readings_schema_is_read() -> None:
    sample = parse_file("no_platforminfo.xml").samples[0]
    assert (sample.power_usage_watts, sample.power_limit_watts) == (183.24, 300.0)


def test_pre_ampere_ecc_schema_gives_volatile_totals() -> None:
    sample = parse_file("no_platforminfo.xml").samples[0]
    assert (sample.ecc_corrected_total, sample.ecc_uncorrected_total) == (3, 1)


def test_pending_page_retirement_is_read() -> None:
    sample = parse_file("no_platforminfo.xml").samples[0]
    assert sample.retired_pages_pending is True


def test_graphics_processes_are_left_out() -> None:
    report = parse_file("no_platforminfo.xml")
    assert [p.pid for p in report.processes] == [77410]


def test_gb200_pairs_of_gpus_share_a_board_serial() -> None:
    devices = parse_file("gb200_shared_serials.xml").devices.devices
    assert [d.serial for d in devices] == [
        "1330124010236",
        "1330124010236",
        "1330124010112",
        "1330124010112",
    ]


def test_gb200_gpus_carry_chassis_serial_and_module_id() -> None:
    devices = parse_file("gb200_shared_serials.xml").devices.devices
    assert [(d.chassis_serial, d.module_id) for d in devices] == [
        ("1821224710051", 1),
        ("1821224710051", 2),
        ("1821224710051", 3),
        ("1821224710051", 4),
    ]


def test_gb200_uuids_stay_unique_where_serials_do_not() -> None:
    devices = parse_file("gb200_shared_serials.xml").devices.devices
    assert len({d.uuid for d in devices}) == 4


def test_mig_devices_get_legacy_mig_names_since_smi_prints_no_mig_uuid() -> None:
    device = parse_file("mig_a100.xml").devices.devices[0]
    gpu = "GPU-5c1c0c6b-7d1e-8b7e-3a4f-2b9c8d7e6f50"
    assert device.mig_devices == (
        MigDevice(0, f"MIG-{gpu}/1/0", 1, 0, None, 40192 * MIB),
        MigDevice(1, f"MIG-{gpu}/5/0", 5, 0, None, 19968 * MIB),
        MigDevice(2, f"MIG-{gpu}/13/0", 13, 0, None, 9728 * MIB),
    )


def test_mig_process_is_matched_to_its_mig_device() -> None:
    report = parse_file("mig_a100.xml")
    assert report.processes[0].mig_uuid == report.devices.devices[0].mig_devices[0].uuid


def test_gpu_module_id_element_of_r535_is_read() -> None:
    devices = parse_file("mig_a100.xml").devices.devices
    assert [d.module_id for d in devices] == [3, 1]


def test_gpu_with_mig_disabled_has_no_mig_devices() -> None:
    device = parse_file("mig_a100.xml").devices.devices[1]
    assert (device.mig_mode, device.mig_devices) == (False, ())


def test_mig_device_uuid_is_taken_when_a_driver_prints_one() -> None:
    body = UUID_BODY + (
        "<mig_devices><mig_device><index>0</index><uuid>MIG-4f1e</uuid>"
        "<gpu_instance_id>1</gpu_instance_id><compute_instance_id>0</compute_instance_id>"
        "</mig_device></mig_devices>"
    )
    device = parse_smi_xml(minimal_doc(body)).devices.devices[0]
    assert device.mig_devices[0].uuid == "MIG-4f1e"


def test_unknown_schema_with_extra_elements_parses() -> None:
    device = parse_file("unknown_schema.xml").devices.devices[0]
    assert (device.uuid, device.memory_total_bytes) == (
        "GPU-e3b0c442-98fc-1c14-9afb-f4c8996fb924",
        276480 * MIB,
    )


def test_compute_cap_is_read_where_a_driver_prints_it() -> None:
    device = parse_file("unknown_schema.xml").devices.devices[0]
    assert device.compute_capability == (10, 3)


def test_unfamiliar_schema_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gpufleet.gpu.smi")
    parse_file("unknown_schema.xml")
    assert any("unfamiliar nvidia-smi schema" in r.getMessage() for r in caplog.records)


def test_unfamiliar_schema_warns_only_once(caplog: pytest.LogCaptureFixture) -> None:
    doc = minimal_doc(UUID_BODY).replace("v12.dtd", "v99.dtd")
    caplog.set_level(logging.DEBUG, logger="gpufleet.gpu.smi")
    parse_smi_xml(doc)
    parse_smi_xml(doc)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]


def test_familiar_schema_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gpufleet.gpu.smi")
    parse_file("h100_na_serial.xml")
    assert caplog.records == []


# --- values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "absent", ["N/A", "[N/A]", "Not Supported", "[Not Supported]", "Unknown Error", "", "  "]
)
def test_absent_value_spellings_read_as_none(absent: str) -> None:
    body = UUID_BODY + f"<temperature><gpu_temp>{absent}</gpu_temp></temperature>"
    assert parse_smi_xml(minimal_doc(body)).samples[0].temperature_celsius is None


def test_missing_elements_read_as_none() -> None:
    report = parse_smi_xml(minimal_doc(UUID_BODY))
    assert report.samples[0] == GpuSample(uuid="GPU-0")


def test_pci_bus_id_falls_back_to_gpu_id_attribute_in_upper_case() -> None:
    doc = minimal_doc(UUID_BODY).replace("00000000:18:00.0", "00000000:af:00.0")
    assert parse_smi_xml(doc).devices.devices[0].pci_bus_id == "00000000:AF:00.0"


def test_ada_lovelace_architecture_reads_as_ada() -> None:
    body = UUID_BODY + "<product_architecture>Ada Lovelace</product_architecture>"
    assert parse_smi_xml(minimal_doc(body)).devices.devices[0].architecture == "ada"


def test_latest_instant_only_power_reading_is_used() -> None:
    body = UUID_BODY + (
        "<gpu_power_readings><average_power_draw>N/A</average_power_draw>"
        "<instant_power_draw>72.50 W</instant_power_draw></gpu_power_readings>"
    )
    assert parse_smi_xml(minimal_doc(body)).samples[0].power_usage_watts == 72.5


def test_leading_blank_lines_before_declaration_are_tolerated() -> None:
    report = parse_smi_xml("\n\n  " + minimal_doc(UUID_BODY))
    assert report.devices.devices[0].uuid == "GPU-0"


# --- errors ----------------------------------------------------------------------


def test_truncated_document_error_names_file_and_position() -> None:
    with pytest.raises(SmiParseError, match=r"^truncated\.xml: line 90, column 19: "):
        parse_file("truncated.xml")


def test_truncated_document_error_names_open_element_and_gpu() -> None:
    with pytest.raises(SmiParseError, match=r"<nvidia_smi_log/gpu/fb_memory_usage/total> of GPU 0"):
        parse_file("truncated.xml")


def test_line_numbers_count_the_leading_blank_lines() -> None:
    with pytest.raises(SmiParseError, match=r": line 3, column"):
        parse_smi_xml("\n\n<nvidia_smi_log><gpu>")


def test_billion_laughs_is_refused_before_expansion() -> None:
    # defusedxml raises on the first entity declaration, so nothing is expanded;
    # an expanding parser would need gigabytes here.
    with pytest.raises(SmiParseError, match=r"^billion_laughs\.xml: refused unsafe XML"):
        parse_file("billion_laughs.xml")


def test_external_entity_is_refused() -> None:
    doc = (
        '<?xml version="1.0"?><!DOCTYPE nvidia_smi_log [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<nvidia_smi_log><gpu><uuid>&x;</uuid></gpu></nvidia_smi_log>"
    )
    with pytest.raises(SmiParseError, match="refused unsafe XML"):
        parse_smi_xml(doc)


def test_wrong_root_element_is_an_error() -> None:
    with pytest.raises(SmiParseError, match=r"pod-a: root element is <html>"):
        parse_smi_xml("<html><body>502 Bad Gateway</body></html>", origin="pod-a")


def test_gpu_without_uuid_is_an_error_naming_the_gpu() -> None:
    doc = minimal_doc(UUID_BODY).replace("<uuid>GPU-0</uuid>", "<uuid>N/A</uuid>")
    with pytest.raises(SmiParseError, match=r"pod-a: GPU 0 \(00000000:18:00.0\) has no <uuid>"):
        parse_smi_xml(doc, origin="pod-a")


def test_unreadable_value_is_an_error_naming_the_element() -> None:
    body = UUID_BODY + "<fb_memory_usage><total>lots</total></fb_memory_usage>"
    with pytest.raises(SmiParseError, match=r"GPU 0 .*<fb_memory_usage/total> .*'lots'"):
        parse_smi_xml(minimal_doc(body))


def test_empty_document_is_an_error() -> None:
    with pytest.raises(SmiParseError, match="pod-a"):
        parse_smi_xml(b"", origin="pod-a")


def test_parse_error_is_a_gpu_error() -> None:
    assert issubclass(SmiParseError, GpuError)


# --- CSV -------------------------------------------------------------------------

CSV_WITH_UNITS = (
    "0, GPU-6a6b3e1c-8a4e-2f7d-91c3-5b0e7d2a4f18, 1652922019281, NVIDIA H100 80GB HBM3, "
    "00000000:18:00.0, 96.00.89.00.01, 81559 MiB, 550.127.05, 9.0, Disabled\n"
)
H100_FROM_CSV = GpuDevice(
    index=0,
    uuid="GPU-6a6b3e1c-8a4e-2f7d-91c3-5b0e7d2a4f18",
    serial="1652922019281",
    product_name="NVIDIA H100 80GB HBM3",
    pci_bus_id="00000000:18:00.0",
    compute_capability=(9, 0),
    vbios_version="96.00.89.00.01",
    memory_total_bytes=81559 * MIB,
    driver_version="550.127.05",
    mig_mode=False,
)


def test_csv_with_units_is_read() -> None:
    assert parse_smi_csv(CSV_WITH_UNITS) == (H100_FROM_CSV,)


def test_csv_without_units_is_read() -> None:
    assert parse_smi_csv(CSV_WITH_UNITS.replace("81559 MiB", "81559")) == (H100_FROM_CSV,)


def test_csv_na_values_read_as_none() -> None:
    text = CSV_WITH_UNITS.replace("1652922019281", "[N/A]").replace("Disabled", "[N/A]")
    device = parse_smi_csv(text)[0]
    assert (device.serial, device.mig_mode) == (None, None)


def test_csv_header_line_is_skipped() -> None:
    header = "index, uuid, serial, name, pci.bus_id, vbios_version, memory.total [MiB], "
    header += "driver_version, compute_cap, mig.mode.current\n"
    assert parse_smi_csv(header + CSV_WITH_UNITS) == (H100_FROM_CSV,)


def test_csv_wrong_column_count_names_origin_and_line() -> None:
    text = CSV_WITH_UNITS + "1, GPU-x, 1652922019282\n"
    with pytest.raises(SmiParseError, match=r"^pod-a: line 2: expected 10 columns, got 3$"):
        parse_smi_csv(text, origin="pod-a")


def test_csv_without_index_column_indexes_by_line() -> None:
    text = "GPU-a, NVIDIA L4, 00000000:01:00.0\nGPU-b, NVIDIA L4, 00000000:02:00.0\n"
    devices = parse_smi_csv(text, ("uuid", "name", "pci.bus_id"))
    assert [d.index for d in devices] == [0, 1]


def test_csv_fields_must_include_identity() -> None:
    with pytest.raises(ValueError, match=r"pci\.bus_id"):
        parse_smi_csv("", ("uuid", "name"))


def test_query_command_asks_for_the_fields_without_units() -> None:
    assert smi_query_command(("uuid", "name")) == (
        "nvidia-smi",
        "--query-gpu=uuid,name",
        "--format=csv,noheader,nounits",
    )


def test_default_query_fields_cover_identity() -> None:
    assert {"uuid", "serial", "name", "pci.bus_id", "memory.total"} <= set(DEFAULT_QUERY_FIELDS)


# --- writer ----------------------------------------------------------------------

GPU_UUID = "GPU-5c1c0c6b-7d1e-8b7e-3a4f-2b9c8d7e6f50"
MIG = MigDevice(0, "MIG-4a1b2c3d-0000-5e6f-8a9b-0c1d2e3f4a5b", 2, 0, "3g.40gb", 40192 * MIB)
A100 = GpuDevice(
    index=0,
    uuid=GPU_UUID,
    serial="1323621045873",
    product_name="NVIDIA A100-SXM4-80GB",
    pci_bus_id="00000000:07:00.0",
    architecture="ampere",
    compute_capability=(8, 0),
    board_part_number="692-2G506-0210-002",
    vbios_version="92.00.45.00.03",
    memory_total_bytes=81920 * MIB + 123,
    driver_version="535.129.03",
    cuda_driver_version="12.2",
    mig_mode=True,
    mig_devices=(MIG,),
)
L4 = GpuDevice(
    index=1,
    uuid="GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",
    serial=None,
    product_name="NVIDIA L4",
    pci_bus_id="00000000:82:00.0",
    architecture="ada",
    memory_total_bytes=23034 * MIB,
    driver_version="535.129.03",
    cuda_driver_version="12.2",
    mig_mode=None,
    module_id=1,
    chassis_serial="1821224710051",
)
DEVICES = DeviceList(
    devices=(A100, L4),
    faults=(GpuFault(2, FaultKind.LOST, "GPU is lost", pci_bus_id="00000000:C1:00.0"),),
    driver_version="535.129.03",
    cuda_driver_version="12.2",
)
SAMPLES = {
    GPU_UUID: GpuSample(
        uuid=GPU_UUID,
        gpu_utilization_percent=87,
        memory_utilization_percent=40,
        memory_used_bytes=12005 * MIB + 7,
        memory_free_bytes=69915 * MIB,
        temperature_celsius=36,
        power_usage_watts=88.164,
        power_limit_watts=400.0,
        clock_sm_mhz=1410,
        clock_memory_mhz=1593,
        ecc_corrected_total=5,
        ecc_uncorrected_total=0,
        retired_pages_pending=False,
        remapped_rows_failure=True,
    )
}
PROCESSES = (
    GpuProcess(22940, GPU_UUID, 11992 * MIB, sm_utilization_percent=80, mig_uuid=MIG.uuid),
    GpuProcess(31337, L4.uuid, None),
    GpuProcess(4, "GPU-not-on-this-node", 1 * MIB),
)


def written() -> str:
    return write_smi_xml(DEVICES, SAMPLES, PROCESSES, timestamp=MOMENT)


def test_written_document_starts_like_nvidia_smi_output() -> None:
    assert written().startswith(
        '<?xml version="1.0" ?>\n<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">\n'
        "<nvidia_smi_log>\n\t<timestamp>Mon Mar  2 10:04:05 2026</timestamp>\n"
    )


@pytest.mark.parametrize(
    "fragment",
    [
        "<total>81920 MiB</total>",
        "<gpu_temp>36 C</gpu_temp>",
        "<average_power_draw>88.16 W</average_power_draw>",
        "<current_power_limit>400.00 W</current_power_limit>",
        "<gpu_util>87 %</gpu_util>",
        "<sm_clock>1410 MHz</sm_clock>",
        "<current_mig>Enabled</current_mig>",
        "<remapped_row_failure>Yes</remapped_row_failure>",
        "<product_architecture>Ada Lovelace</product_architecture>",
        '<gpu id="00000000:07:00.0">',
    ],
)
def test_written_values_use_nvidia_smi_formats(fragment: str) -> None:
    assert fragment in written()


def test_writer_writes_missing_values_as_na_rather_than_inventing_them() -> None:
    assert "<serial>N/A</serial>" in written()


def test_writer_prints_none_for_a_gpu_without_mig_devices() -> None:
    assert "<mig_devices>None</mig_devices>" in written()


def test_writer_prints_no_mig_uuid_like_real_nvidia_smi() -> None:
    assert MIG.uuid not in written()


def test_writer_omits_lost_gpus_but_counts_them_as_attached() -> None:
    report = parse_smi_xml(written())
    assert (len(report.devices.devices), report.attached_gpus) == (2, 3)


def test_stderr_lines_report_lost_gpus_as_nvidia_smi_does() -> None:
    assert smi_stderr_lines(DEVICES) == (
        "Unable to determine the device handle for GPU00000000:C1:00.0: "
        "GPU is lost. Reboot the system to recover this GPU",
    )


def test_writer_escapes_markup_in_names() -> None:
    odd = DeviceList(devices=(GpuDevice(0, "GPU-0", None, 'A&B <"GPU">', "00000000:01:00.0"),))
    report = parse_smi_xml(write_smi_xml(odd, {}, (), timestamp=MOMENT))
    assert report.devices.devices[0].product_name == 'A&B <"GPU">'


def test_round_trip_gives_what_smi_visible_promises() -> None:
    report = parse_smi_xml(written())
    assert report == smi_visible(DEVICES, SAMPLES, PROCESSES, timestamp=MOMENT)


def test_round_trip_keeps_memory_to_the_mib() -> None:
    device = parse_smi_xml(written()).devices.devices[0]
    assert device.memory_total_bytes == (A100.memory_total_bytes or 0) // MIB * MIB


def test_round_trip_keeps_power_to_the_centiwatt() -> None:
    assert parse_smi_xml(written()).samples[0].power_usage_watts == 88.16


def test_round_trip_keeps_mig_process_on_its_mig_device() -> None:
    report = parse_smi_xml(written())
    assert report.processes[0].mig_uuid == report.devices.devices[0].mig_devices[0].uuid


def test_round_trip_keeps_chassis_serial_and_module_id() -> None:
    device = parse_smi_xml(written()).devices.devices[1]
    assert (device.chassis_serial, device.module_id) == ("1821224710051", 1)


def test_round_trip_of_a_hand_written_document_is_stable() -> None:
    # real document -> model -> written document -> model: the second read changes nothing
    first = parse_file("mig_a100.xml")
    samples = {s.uuid: s for s in first.samples}
    again = parse_smi_xml(write_smi_xml(first.devices, samples, first.processes))
    assert again.devices == first.devices


# --- SmiXmlSource ----------------------------------------------------------------


def test_source_is_a_gpu_source() -> None:
    assert isinstance(SmiXmlSource(written()), GpuSource)


def test_source_reads_a_file() -> None:
    source = SmiXmlSource(path=DATA / "gb200_shared_serials.xml")
    assert len(source.devices().devices) == 4


def test_source_errors_name_the_file() -> None:
    with pytest.raises(SmiParseError, match=r"truncated\.xml: line 90"):
        SmiXmlSource(path=DATA / "truncated.xml")


def test_source_missing_file_is_a_gpu_error() -> None:
    with pytest.raises(GpuError, match=r"missing\.xml: cannot read"):
        SmiXmlSource(path=DATA / "missing.xml")


def test_source_samples_by_uuid() -> None:
    source = SmiXmlSource(written())
    assert source.sample(GPU_UUID).temperature_celsius == 36


def test_source_lists_processes_of_one_gpu() -> None:
    source = SmiXmlSource(written())
    assert [p.pid for p in source.processes(L4.uuid)] == [31337]


def test_source_unknown_gpu_is_an_error() -> None:
    with pytest.raises(GpuError, match="GPU-unknown"):
        SmiXmlSource(written(), origin="pod-a").sample("GPU-unknown")


def test_source_has_no_event_stream() -> None:
    with pytest.raises(GpuError, match="no event stream"):
        SmiXmlSource(written()).xid_events()


# --- every simulator preset through NvmlSource -> XML -> parser --------------------


def _busy(library: SimulatedNvml) -> None:
    """Start compute processes on GPU 0, one on its first MIG instance where it has one."""
    mig_index = 0 if library.gpu(0).mig_instances else None
    library.add_process(
        0, 4242, used_memory_bytes=3 * 1024**3 + 5, sm_util_percent=55, mig_index=mig_index
    )
    library.add_process(0, 4343, used_memory_bytes=1 * 1024**3)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_round_trips_through_smi_xml(preset: str) -> None:
    library = open_sim(preset)
    _busy(library)
    source = NvmlSource(library)
    try:
        snap = take_snapshot(source)
    finally:
        source.close()
    xml = write_smi_xml(snap.devices, snap.samples, snap.processes, timestamp=MOMENT)
    assert parse_smi_xml(xml) == smi_visible(
        snap.devices, snap.samples, snap.processes, timestamp=MOMENT
    )


def test_mig_preset_process_round_trips_onto_its_mig_device() -> None:
    library = open_sim("mig-a100")
    _busy(library)
    source = NvmlSource(library)
    try:
        devices = source.devices()
        processes = source.processes(devices.devices[0].uuid)
    finally:
        source.close()
    report = parse_smi_xml(write_smi_xml(devices, {}, processes, timestamp=MOMENT))
    assert report.processes[0].mig_uuid == report.devices.devices[0].mig_devices[0].uuid
