"""What a parse of a written ``nvidia-smi -q -x`` document gives back.

``parse_smi_xml(write_smi_xml(devices, samples, processes))`` is not the model
it was written from: the XML holds whole MiB, 0.01 W, no compute capability,
no MIG UUID. :func:`smi_visible` states that reduction field by field, so a
test can say what a simulated node's answer holds without parsing it. It
follows the writer's choices, so it builds on ``write.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from gpufleet.gpu.model import DeviceList, GpuDevice, GpuProcess, GpuSample
from gpufleet.gpu.smi._values import (
    architecture_from_smi,
    architecture_to_smi,
    mib_floor,
    mig_uuid_for,
    present,
    smi_timestamp,
)
from gpufleet.gpu.smi.parse import SmiReport
from gpufleet.gpu.smi.write import document_versions, mig_of


def smi_visible(
    devices: DeviceList,
    samples: Mapping[str, GpuSample],
    processes: Sequence[GpuProcess],
    *,
    timestamp: datetime | None = None,
) -> SmiReport:
    """What ``parse_smi_xml(write_smi_xml(devices, samples, processes))`` gives back.

    The normalisation, field by field:

    * memory (GPU and MIG totals, used, free, per process) is floored to whole MiB;
    * power is rounded to 0.01 W, as nvidia-smi prints it;
    * ``index`` becomes the position in the document, and faults are dropped;
    * every GPU gets the document's driver and CUDA versions;
    * ``compute_capability`` becomes ``None`` (not in ``-q -x`` v12);
    * MIG devices get the ``MIG-<GPU-UUID>/<GI>/<CI>`` name and no profile, and a
      process's ``mig_uuid`` follows (``None`` where its MIG device is unknown);
    * ``sm_utilization_percent`` of processes becomes ``None``;
    * architecture names go through nvidia-smi's spelling ("Ada Lovelace" <-> "ada"),
      "N/A"-like and empty strings become ``None``.
    """
    driver, cuda = document_versions(devices)
    visible = tuple(
        _visible_device(device, position, driver, cuda)
        for position, device in enumerate(devices.devices)
    )
    return SmiReport(
        devices=DeviceList(devices=visible, driver_version=driver, cuda_driver_version=cuda),
        samples=tuple(_visible_sample(d.uuid, samples.get(d.uuid)) for d in devices.devices),
        processes=tuple(
            _visible_process(process, device)
            for device in devices.devices
            for process in processes
            if process.gpu_uuid == device.uuid
        ),
        timestamp=smi_timestamp(timestamp) if timestamp is not None else None,
        driver_version=driver,
        cuda_version=cuda,
        attached_gpus=len(devices.devices) + len(devices.faults),
    )


def _visible_device(
    device: GpuDevice, position: int, driver: str | None, cuda: str | None
) -> GpuDevice:
    migs = tuple(
        replace(
            mig,
            uuid=mig_uuid_for(device.uuid, mig.gpu_instance_id, mig.compute_instance_id, mig.index),
            profile=None,
            memory_total_bytes=mib_floor(mig.memory_total_bytes),
        )
        for mig in device.mig_devices
    )
    return replace(
        device,
        index=position,
        serial=present(device.serial),
        product_name=present(device.product_name) or "",
        pci_bus_id=(present(device.pci_bus_id) or "").upper(),
        architecture=architecture_from_smi(architecture_to_smi(device.architecture)),
        compute_capability=None,
        board_part_number=present(device.board_part_number),
        vbios_version=present(device.vbios_version),
        memory_total_bytes=mib_floor(device.memory_total_bytes),
        driver_version=driver,
        cuda_driver_version=cuda,
        mig_devices=migs,
        chassis_serial=present(device.chassis_serial),
    )


def _visible_sample(uuid: str, sample: GpuSample | None) -> GpuSample:
    if sample is None:
        return GpuSample(uuid=uuid)
    return replace(
        sample,
        uuid=uuid,
        memory_used_bytes=mib_floor(sample.memory_used_bytes),
        memory_free_bytes=mib_floor(sample.memory_free_bytes),
        power_usage_watts=_centiwatts(sample.power_usage_watts),
        power_limit_watts=_centiwatts(sample.power_limit_watts),
    )


def _visible_process(process: GpuProcess, device: GpuDevice) -> GpuProcess:
    mig = mig_of(process, device)
    mig_uuid = None
    if mig is not None and mig.gpu_instance_id is not None and mig.compute_instance_id is not None:
        mig_uuid = mig_uuid_for(device.uuid, mig.gpu_instance_id, mig.compute_instance_id, -1)
    return replace(
        process,
        used_memory_bytes=mib_floor(process.used_memory_bytes),
        sm_utilization_percent=None,
        mig_uuid=mig_uuid,
    )


def _centiwatts(watts: float | None) -> float | None:
    return None if watts is None else float(f"{watts:.2f}")
