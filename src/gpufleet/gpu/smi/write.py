"""Write an ``nvidia-smi -q -x`` document from the GPU model.

This is what a simulated node answers when asked for ``nvidia-smi -q -x``. The
document follows the real one (``nvsmi_device_v12.dtd``, drivers R535-R580): the
same elements in the same order, the same value formats ("81559 MiB", "33 C",
"69.89 W", "Enabled", "N/A") and tab indentation. Only elements the model has a
value for are written, and a value the model does not have is written "N/A":
the writer never invents data.

What a parse of this document gives back, the same facts reduced to what the
XML can carry, is ``visible.py``'s :func:`smi_visible`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import datetime

from gpufleet.gpu.model import (
    DeviceList,
    FaultKind,
    GpuDevice,
    GpuProcess,
    GpuSample,
    MigDevice,
)
from gpufleet.gpu.smi._values import MIB, NA, architecture_to_smi, smi_timestamp

DTD = "nvsmi_device_v12.dtd"
_PROLOGUE = f'<?xml version="1.0" ?>\n<!DOCTYPE nvidia_smi_log SYSTEM "{DTD}">\n'
_BUS_ID = re.compile(r"^([0-9A-F]+):([0-9A-F]{2}):([0-9A-F]{2})\.[0-7]$")


def write_smi_xml(
    devices: DeviceList,
    samples: Mapping[str, GpuSample],
    processes: Sequence[GpuProcess],
    *,
    timestamp: datetime | None = None,
) -> str:
    """Render ``nvidia-smi -q -x`` output for ``devices``.

    ``samples`` are keyed by GPU UUID; a GPU without one gets "N/A" telemetry.
    ``processes`` are placed under their GPU; processes of unknown GPUs are left
    out. GPUs in ``devices.faults`` are left out, as nvidia-smi does (it reports
    them on stderr, see :func:`smi_stderr_lines`), but ``<attached_gpus>`` counts
    them. ``timestamp`` defaults to now, in local time as nvidia-smi prints it.
    """
    moment = timestamp if timestamp is not None else datetime.now().astimezone()
    driver, cuda = document_versions(devices)
    root = ET.Element("nvidia_smi_log")
    _leaf(root, "timestamp", smi_timestamp(moment))
    _leaf(root, "driver_version", driver)
    _leaf(root, "cuda_version", cuda)
    _leaf(root, "attached_gpus", str(len(devices.devices) + len(devices.faults)))
    for device in devices.devices:
        own = [p for p in processes if p.gpu_uuid == device.uuid]
        _write_gpu(root, device, samples.get(device.uuid), own)
    ET.indent(root, space="\t")
    return _PROLOGUE + ET.tostring(root, encoding="unicode", short_empty_elements=False) + "\n"


def smi_stderr_lines(devices: DeviceList) -> tuple[str, ...]:
    """What nvidia-smi prints on stderr for the GPUs it cannot read (``devices.faults``)."""
    lines: list[str] = []
    for fault in devices.faults:
        where = fault.pci_bus_id or str(fault.index)
        if fault.kind is FaultKind.LOST:
            reason = "GPU is lost. Reboot the system to recover this GPU"
        else:
            reason = fault.message
        lines.append(f"Unable to determine the device handle for GPU{where}: {reason}")
    return tuple(lines)


def document_versions(devices: DeviceList) -> tuple[str | None, str | None]:
    """The driver and CUDA versions a document for ``devices`` states once, at the top."""
    driver = devices.driver_version
    cuda = devices.cuda_driver_version
    for device in devices.devices:
        driver = driver or device.driver_version
        cuda = cuda or device.cuda_driver_version
    return driver, cuda


def _leaf(parent: ET.Element, tag: str, text: str | None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    element.text = NA if text is None else text
    return element


def _group(parent: ET.Element, tag: str, values: Sequence[tuple[str, str | None]]) -> ET.Element:
    element = ET.SubElement(parent, tag)
    for child, text in values:
        _leaf(element, child, text)
    return element


def _fmt(value: int | float | None, unit: str) -> str | None:
    return None if value is None else f"{value} {unit}"


def _mib(value: int | None) -> str | None:
    return None if value is None else f"{value // MIB} MiB"


def _watts(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f} W"


def _flag(value: bool | None, yes: str = "Yes", no: str = "No") -> str | None:
    return None if value is None else (yes if value else no)


def _number(value: int | None) -> str | None:
    return None if value is None else str(value)


def _write_gpu(
    root: ET.Element, device: GpuDevice, sample: GpuSample | None, processes: Sequence[GpuProcess]
) -> None:
    gpu = ET.SubElement(root, "gpu", id=device.pci_bus_id)
    s = sample if sample is not None else GpuSample(uuid=device.uuid)
    _leaf(gpu, "product_name", device.product_name)
    _leaf(gpu, "product_architecture", architecture_to_smi(device.architecture))
    # The model has no pending MIG mode, so it is not claimed to equal the current one.
    _group(
        gpu,
        "mig_mode",
        [("current_mig", _flag(device.mig_mode, "Enabled", "Disabled")), ("pending_mig", None)],
    )
    _write_mig_devices(gpu, device.mig_devices)
    _leaf(gpu, "serial", device.serial)
    _leaf(gpu, "uuid", device.uuid)
    _leaf(gpu, "vbios_version", device.vbios_version)
    _leaf(gpu, "board_part_number", device.board_part_number)
    if device.chassis_serial is not None or device.module_id is not None:
        _group(
            gpu,
            "platformInfo",
            [
                ("chassis_serial_number", device.chassis_serial),
                ("slot_number", None),
                ("tray_index", None),
                ("host_id", None),
                ("peer_type", None),
                ("module_id", _number(device.module_id)),
                ("gpu_fabric_guid", None),
            ],
        )
    _write_pci(gpu, device.pci_bus_id)
    _group(
        gpu,
        "fb_memory_usage",
        [
            ("total", _mib(device.memory_total_bytes)),
            ("used", _mib(s.memory_used_bytes)),
            ("free", _mib(s.memory_free_bytes)),
        ],
    )
    _group(
        gpu,
        "utilization",
        [
            ("gpu_util", _fmt(s.gpu_utilization_percent, "%")),
            ("memory_util", _fmt(s.memory_utilization_percent, "%")),
        ],
    )
    ecc = ET.SubElement(gpu, "ecc_errors")
    # The model holds totals only: they are written as the DRAM counters and the
    # SRAM breakdown stays N/A. The parser sums the counters, so totals round-trip.
    _group(
        ecc,
        "volatile",
        [
            ("sram_correctable", None),
            ("sram_uncorrectable_parity", None),
            ("sram_uncorrectable_secded", None),
            ("dram_correctable", _number(s.ecc_corrected_total)),
            ("dram_uncorrectable", _number(s.ecc_uncorrected_total)),
        ],
    )
    _group(
        ecc,
        "aggregate",
        [
            ("sram_correctable", None),
            ("sram_uncorrectable_parity", None),
            ("sram_uncorrectable_secded", None),
            ("dram_correctable", None),
            ("dram_uncorrectable", None),
            ("sram_threshold_exceeded", None),
        ],
    )
    _group(
        gpu,
        "retired_pages",
        [
            ("pending_blacklist", _flag(s.retired_pages_pending)),
            ("pending_retirement", _flag(s.retired_pages_pending)),
        ],
    )
    _group(
        gpu,
        "remapped_rows",
        [
            ("remapped_row_corr", None),
            ("remapped_row_unc", None),
            ("remapped_row_pending", None),
            ("remapped_row_failure", _flag(s.remapped_rows_failure)),
        ],
    )
    _group(gpu, "temperature", [("gpu_temp", _fmt(s.temperature_celsius, "C"))])
    # NVML's power usage is what R545+ prints as the average power draw.
    _group(
        gpu,
        "gpu_power_readings",
        [
            ("average_power_draw", _watts(s.power_usage_watts)),
            ("instant_power_draw", None),
            ("current_power_limit", _watts(s.power_limit_watts)),
        ],
    )
    _group(
        gpu,
        "clocks",
        [
            ("sm_clock", _fmt(s.clock_sm_mhz, "MHz")),
            ("mem_clock", _fmt(s.clock_memory_mhz, "MHz")),
        ],
    )
    _write_processes(gpu, device, processes)


def _write_mig_devices(gpu: ET.Element, migs: Sequence[MigDevice]) -> None:
    container = ET.SubElement(gpu, "mig_devices")
    if not migs:
        container.text = "None"
        return
    for mig in migs:
        element = ET.SubElement(container, "mig_device")
        _leaf(element, "index", str(mig.index))
        _leaf(element, "gpu_instance_id", _number(mig.gpu_instance_id))
        _leaf(element, "compute_instance_id", _number(mig.compute_instance_id))
        _group(
            element,
            "fb_memory_usage",
            [
                ("total", _mib(mig.memory_total_bytes)),
                ("used", None),
                ("free", None),
            ],
        )


def _write_pci(gpu: ET.Element, bus_id: str) -> None:
    pci = ET.SubElement(gpu, "pci")
    match = _BUS_ID.match(bus_id.upper())
    if match is not None:
        domain, bus, device = match.groups()
        _leaf(pci, "pci_bus", bus)
        _leaf(pci, "pci_device", device)
        _leaf(pci, "pci_domain", f"{int(domain, 16):04X}")
    _leaf(pci, "pci_bus_id", bus_id)


def _write_processes(gpu: ET.Element, device: GpuDevice, processes: Sequence[GpuProcess]) -> None:
    container = ET.SubElement(gpu, "processes")
    container.text = ""
    for process in processes:
        mig = mig_of(process, device)
        gi = mig.gpu_instance_id if mig is not None else None
        ci = mig.compute_instance_id if mig is not None else None
        _group(
            container,
            "process_info",
            [
                ("gpu_instance_id", _number(gi)),
                ("compute_instance_id", _number(ci)),
                ("pid", str(process.pid)),
                ("type", "C"),
                ("process_name", None),
                ("used_memory", _mib(process.used_memory_bytes)),
            ],
        )


def mig_of(process: GpuProcess, device: GpuDevice) -> MigDevice | None:
    """The MIG device of ``device`` that ``process`` runs on, or ``None`` (not MIG, or unknown)."""
    if process.mig_uuid is None:
        return None
    return next((m for m in device.mig_devices if m.uuid == process.mig_uuid), None)
