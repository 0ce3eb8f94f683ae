"""Read ``nvidia-smi -q -x`` into the GPU model.

The parser is tolerant of what it does not know (elements, schema and driver
versions come and go between drivers) and strict about what it does: a known
element holding a value it cannot read is an error naming the element, not a
silent ``None``. Parsing goes through ``defusedxml``, so entity expansion
("billion laughs") and external entities are refused before anything expands.

What the XML cannot carry, and how the parser fills the gap:

* the GPU index is the position of ``<gpu>`` in the document (``minor_number``
  is the ``/dev/nvidiaN`` number, not the index);
* compute capability is only read where a ``<compute_cap>`` element exists;
* MIG devices have no UUID in ``-q -x``: a ``<uuid>`` child is used if a driver
  ever prints one, otherwise the legacy ``MIG-<GPU-UUID>/<GI>/<CI>`` name (see
  :func:`mig_uuid_for`); MIG profile names are not printed either (``None``);
* processes are matched to their MIG device by (GPU instance, compute instance);
  graphics-only processes (type ``G``) are left out, as ``GpuSource.processes``
  lists compute processes.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from xml.etree.ElementTree import Element, ParseError
from xml.parsers.expat import ErrorString

import defusedxml
import defusedxml.ElementTree

from gpufleet.gpu.model import DeviceList, GpuDevice, GpuProcess, GpuSample, MigDevice
from gpufleet.gpu.smi._values import (
    SmiParseError,
    architecture_from_smi,
    mig_uuid_for,
    present,
    to_bool,
    to_bytes,
    to_compute_capability,
    to_float,
    to_int,
)

log = logging.getLogger(__name__)

ROOT_TAG = "nvidia_smi_log"

_NEWEST_KNOWN_DTD = 12
_NEWEST_KNOWN_DRIVER_MAJOR = 580
_DOCTYPE = re.compile(rb"<!DOCTYPE\s+nvidia_smi_log\s+SYSTEM\s+[\"']([^\"']*)[\"']")
_DTD_NAME = re.compile(r"^nvsmi_device(?:_v(\d+))?\.dtd$")
# One warning per unfamiliar (DTD, driver) per process, then debug: a fleet on a new
# driver must not log a warning for every node on every scan.
_warned_schemas: set[tuple[str | None, str | None]] = set()
_WARNED_LIMIT = 64

_PERCENT = frozenset({"%"})
_CELSIUS = frozenset({"C"})
_MHZ = frozenset({"MHz"})
_WATTS = frozenset({"W"})
_NONE: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SmiReport:
    """Everything one ``nvidia-smi -q -x`` document says, in the GPU model.

    ``samples`` holds one sample per device, in device order; ``processes`` holds
    the compute processes of every GPU, in document order.
    """

    devices: DeviceList
    samples: tuple[GpuSample, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    timestamp: str | None = None
    """The ``<timestamp>`` text as nvidia-smi printed it (local time, C ``ctime`` format)."""
    driver_version: str | None = None
    cuda_version: str | None = None
    attached_gpus: int | None = None
    """How many GPUs the driver sees, readable or not; more than ``devices`` means lost GPUs."""


def parse_smi_xml(data: bytes | str, *, origin: str = "<input>") -> SmiReport:
    """Parse an ``nvidia-smi -q -x`` document.

    ``origin`` names where the document came from (a pod, a file) and starts every
    error message. Raises :class:`SmiParseError` for malformed or truncated XML,
    a document refused as unsafe, a wrong root element, a GPU without a UUID, or a
    known element with an unreadable value.
    """
    root = _load(data, origin)
    if root.tag != ROOT_TAG:
        raise SmiParseError(f"{origin}: root element is <{root.tag}>, expected <{ROOT_TAG}>")
    driver = present(root.findtext("driver_version"))
    cuda = present(root.findtext("cuda_version"))
    _note_schema(_doctype(data), driver, origin)

    devices: list[GpuDevice] = []
    samples: list[GpuSample] = []
    processes: list[GpuProcess] = []
    for index, gpu in enumerate(root.findall("gpu")):
        reader = _GpuReader(gpu, index, origin)
        device = reader.device(driver, cuda)
        devices.append(device)
        samples.append(reader.sample(device.uuid))
        processes.extend(reader.processes(device))
    return SmiReport(
        devices=DeviceList(devices=tuple(devices), driver_version=driver, cuda_driver_version=cuda),
        samples=tuple(samples),
        processes=tuple(processes),
        timestamp=present(root.findtext("timestamp")),
        driver_version=driver,
        cuda_version=cuda,
        attached_gpus=to_int(root.findtext("attached_gpus"), _NONE, f"{origin}: <attached_gpus>"),
    )


def _load(data: bytes | str, origin: str) -> Element:
    # expat rejects whitespace before the XML declaration, which shells and exec
    # streams like to add; drop it, and keep line numbers true to the input.
    stripped = data.lstrip()
    skipped = data[: len(data) - len(stripped)]
    lines_skipped = skipped.count(b"\n") if isinstance(skipped, bytes) else skipped.count("\n")
    source = io.BytesIO(stripped) if isinstance(stripped, bytes) else io.StringIO(stripped)

    open_tags: list[str] = []
    gpus_seen = 0
    root: Element | None = None
    try:
        for event, element in defusedxml.ElementTree.iterparse(source, events=("start", "end")):
            if event == "start":
                root = element if root is None else root
                open_tags.append(element.tag)
                if len(open_tags) == 2 and element.tag == "gpu":
                    gpus_seen += 1
            else:
                open_tags.pop()
    except ParseError as exc:
        line, column = exc.position
        inside = _describe_open(open_tags, gpus_seen)
        raise SmiParseError(
            f"{origin}: line {line + lines_skipped}, column {column + 1}: "
            f"malformed nvidia-smi XML ({ErrorString(exc.code)}){inside}"
        ) from None
    except defusedxml.DefusedXmlException as exc:
        raise SmiParseError(f"{origin}: refused unsafe XML: {exc}") from None
    if root is None:
        raise SmiParseError(f"{origin}: empty document")
    return root


def _describe_open(open_tags: list[str], gpus_seen: int) -> str:
    if not open_tags:
        return ""
    path = "/".join(open_tags)
    if len(open_tags) >= 2 and open_tags[1] == "gpu":
        return f" inside <{path}> of GPU {gpus_seen - 1}"
    return f" inside <{path}>"


def _doctype(data: bytes | str) -> str | None:
    head = data[:1024]
    match = _DOCTYPE.search(head if isinstance(head, bytes) else head.encode("utf-8", "replace"))
    return match.group(1).decode("ascii", "replace") if match else None


def _note_schema(dtd: str | None, driver: str | None, origin: str) -> None:
    unfamiliar: list[str] = []
    if dtd is not None:
        match = _DTD_NAME.match(dtd)
        if match is None or (match.group(1) and int(match.group(1)) > _NEWEST_KNOWN_DTD):
            unfamiliar.append(f"DTD {dtd}")
    major = driver.partition(".")[0] if driver else ""
    if major.isdigit() and int(major) > _NEWEST_KNOWN_DRIVER_MAJOR:
        unfamiliar.append(f"driver {driver}")
    if not unfamiliar:
        return
    key = (dtd, major or None)
    first = key not in _warned_schemas and len(_warned_schemas) < _WARNED_LIMIT
    if first:
        _warned_schemas.add(key)
    log.log(
        logging.WARNING if first else logging.DEBUG,
        "%s: unfamiliar nvidia-smi schema (%s); reading the elements gpufleet knows",
        origin,
        ", ".join(unfamiliar),
    )


class _GpuReader:
    """Reads one ``<gpu>`` element; every error names the origin, the GPU and the element."""

    def __init__(self, gpu: Element, index: int, origin: str) -> None:
        self._gpu = gpu
        self._index = index
        self._origin = origin
        self._label = f"GPU {index} ({gpu.get('id', 'no id')})"

    def _where(self, path: str) -> str:
        return f"{self._origin}: {self._label} <{path}>"

    def _text(self, path: str) -> str | None:
        return present(self._gpu.findtext(path))

    def _first(self, *paths: str) -> tuple[str, str | None]:
        """The first of ``paths`` that holds a value (else the first path and ``None``)."""
        for path in paths:
            value = self._text(path)
            if value is not None:
                return path, value
        return paths[0], None

    def _int(self, path: str, units: frozenset[str]) -> int | None:
        return to_int(self._text(path), units, self._where(path))

    def _bytes(self, path: str) -> int | None:
        return to_bytes(self._text(path), self._where(path))

    def device(self, driver: str | None, cuda: str | None) -> GpuDevice:
        uuid = self._text("uuid")
        if uuid is None:
            raise SmiParseError(f"{self._origin}: {self._label} has no <uuid>")
        module_path, module_text = self._first(
            "module_id", "gpu_module_id", "platformInfo/module_id"
        )
        bus_id = self._text("pci/pci_bus_id") or present(self._gpu.get("id")) or ""
        return GpuDevice(
            index=self._index,
            uuid=uuid,
            serial=self._text("serial"),
            product_name=self._text("product_name") or "",
            pci_bus_id=bus_id.upper(),
            architecture=architecture_from_smi(self._text("product_architecture")),
            compute_capability=to_compute_capability(
                self._text("compute_cap"), self._where("compute_cap")
            ),
            board_part_number=self._text("board_part_number"),
            vbios_version=self._text("vbios_version"),
            memory_total_bytes=self._bytes("fb_memory_usage/total"),
            driver_version=driver,
            cuda_driver_version=cuda,
            mig_mode=to_bool(self._text("mig_mode/current_mig"), self._where("current_mig")),
            mig_devices=self._mig_devices(uuid),
            module_id=to_int(module_text, _NONE, self._where(module_path)),
            chassis_serial=self._text("platformInfo/chassis_serial_number"),
        )

    def _mig_devices(self, gpu_uuid: str) -> tuple[MigDevice, ...]:
        migs: list[MigDevice] = []
        for position, mig in enumerate(self._gpu.findall("mig_devices/mig_device")):
            where = f"{self._where('mig_devices')} MIG device {position}"
            index = to_int(mig.findtext("index"), _NONE, where + " <index>")
            index = position if index is None else index
            gi = to_int(mig.findtext("gpu_instance_id"), _NONE, where + " <gpu_instance_id>")
            ci = to_int(
                mig.findtext("compute_instance_id"), _NONE, where + " <compute_instance_id>"
            )
            migs.append(
                MigDevice(
                    index=index,
                    uuid=present(mig.findtext("uuid")) or mig_uuid_for(gpu_uuid, gi, ci, index),
                    gpu_instance_id=gi,
                    compute_instance_id=ci,
                    memory_total_bytes=to_bytes(
                        mig.findtext("fb_memory_usage/total"), where + " <fb_memory_usage/total>"
                    ),
                )
            )
        return tuple(migs)

    def sample(self, uuid: str) -> GpuSample:
        corrected, uncorrected = self._ecc_totals()
        # R535 renamed <power_readings> to <gpu_power_readings> (and later split
        # <power_draw> into average and instant readings).
        new_schema = self._gpu.find("gpu_power_readings") is not None
        power_root = "gpu_power_readings" if new_schema else "power_readings"
        draw_path, draw = self._first(
            f"{power_root}/power_draw",
            f"{power_root}/average_power_draw",
            f"{power_root}/instant_power_draw",
        )
        limit_path, limit = self._first(
            f"{power_root}/current_power_limit",
            f"{power_root}/power_limit",
            f"{power_root}/enforced_power_limit",
        )
        pending_path, pending = self._first(
            "retired_pages/pending_retirement", "retired_pages/pending_blacklist"
        )
        failure_path, failure = self._first(
            "remapped_rows/remapped_row_failure", "remapped_rows/remapping_failure_occurred"
        )
        return GpuSample(
            uuid=uuid,
            gpu_utilization_percent=self._int("utilization/gpu_util", _PERCENT),
            memory_utilization_percent=self._int("utilization/memory_util", _PERCENT),
            memory_used_bytes=self._bytes("fb_memory_usage/used"),
            memory_free_bytes=self._bytes("fb_memory_usage/free"),
            temperature_celsius=self._int("temperature/gpu_temp", _CELSIUS),
            power_usage_watts=to_float(draw, _WATTS, self._where(draw_path)),
            power_limit_watts=to_float(limit, _WATTS, self._where(limit_path)),
            clock_sm_mhz=self._int("clocks/sm_clock", _MHZ),
            clock_memory_mhz=self._int("clocks/mem_clock", _MHZ),
            ecc_corrected_total=corrected,
            ecc_uncorrected_total=uncorrected,
            retired_pages_pending=to_bool(pending, self._where(pending_path)),
            remapped_rows_failure=to_bool(failure, self._where(failure_path)),
        )

    def _ecc_totals(self) -> tuple[int | None, int | None]:
        """Volatile (since driver load) ECC totals, as nvidia-smi's summary table shows."""
        volatile = self._gpu.find("ecc_errors/volatile")
        if volatile is None:
            return None, None
        if volatile.find("single_bit") is not None or volatile.find("double_bit") is not None:
            # The pre-Ampere schema prints the totals itself.
            return (
                self._int("ecc_errors/volatile/single_bit/total", _NONE),
                self._int("ecc_errors/volatile/double_bit/total", _NONE),
            )
        corrected: int | None = None
        uncorrected: int | None = None
        for counter in volatile:
            # sram_/dram_ (un)correctable, and sram_uncorrectable_parity/_secded since R535.
            if "correctable" not in counter.tag:
                continue
            value = self._int(f"ecc_errors/volatile/{counter.tag}", _NONE)
            if value is None:
                continue
            if "uncorrectable" in counter.tag:
                uncorrected = (uncorrected or 0) + value
            else:
                corrected = (corrected or 0) + value
        return corrected, uncorrected

    def processes(self, device: GpuDevice) -> list[GpuProcess]:
        found: list[GpuProcess] = []
        for position, info in enumerate(self._gpu.findall("processes/process_info")):
            where = f"{self._where('processes')} process {position}"
            kind = present(info.findtext("type"))
            if kind is not None and "C" not in kind:
                continue
            pid = to_int(info.findtext("pid"), _NONE, where + " <pid>")
            if pid is None:
                log.debug("%s has no pid; skipped", where)
                continue
            gi = to_int(info.findtext("gpu_instance_id"), _NONE, where + " <gpu_instance_id>")
            ci = to_int(
                info.findtext("compute_instance_id"), _NONE, where + " <compute_instance_id>"
            )
            found.append(
                GpuProcess(
                    pid=pid,
                    gpu_uuid=device.uuid,
                    used_memory_bytes=to_bytes(
                        info.findtext("used_memory"), where + " <used_memory>"
                    ),
                    mig_uuid=_mig_uuid_of(device, gi, ci),
                )
            )
        return found


def _mig_uuid_of(device: GpuDevice, gi: int | None, ci: int | None) -> str | None:
    if gi is None or ci is None:
        return None
    for mig in device.mig_devices:
        if (mig.gpu_instance_id, mig.compute_instance_id) == (gi, ci):
            return mig.uuid
    return mig_uuid_for(device.uuid, gi, ci, index=-1)
