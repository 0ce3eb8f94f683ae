"""``NvmlSource``: the one piece of gpufleet that calls NVML.

It takes a module with pynvml's function surface: the real ``pynvml`` from
nvidia-ml-py on a GPU node, or a ``gpufleet.gpu.sim.SimulatedNvml`` everywhere
else. Nothing here knows which one it has.

How NVML answers become the model:

- ``NotSupported``, ``FunctionNotFound`` (older driver) and
  ``ArgumentVersionMismatch`` (struct newer than the driver) mean "this GPU or
  driver does not report it": the field is ``None``.
- ``GpuIsLost`` anywhere while reading a GPU's identity makes that GPU a
  ``GpuFault(kind=LOST)``; any other NVML error makes it a
  ``GpuFault(kind=ERROR)`` naming the call. The other GPUs are still returned.
- Strings are kept as NVML gives them, except that an empty string becomes
  ``None``: deciding that ``"N/A"`` or ``"0"`` is not a real serial is the
  inventory layer's business, not the driver binding's.
- PCI bus ids are normalised to ``DDDDDDDD:BB:DD.F`` in upper case, the CUDA
  driver version ``12040`` to ``"12.4"``, ``NVML_DEVICE_ARCH_*`` to a lower-case
  name (``hopper``).
- ECC totals in samples are the volatile counters (since the driver loaded),
  like nvidia-smi's "Volatile" section.

``xid_events`` registers the GPUs; waiting on the event set is
``nvml_events.NvmlXidEventStream``'s job.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from gpufleet.gpu.model import (
    DeviceList,
    FaultKind,
    GpuDevice,
    GpuFault,
    GpuProcess,
    GpuSample,
    MigDevice,
)
from gpufleet.gpu.nvml_events import NvmlXidEventStream, handle_address
from gpufleet.gpu.source import GpuError, GpuLostError

_log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware UTC."""

NvmlModule = Any
"""A module (or object) with pynvml's surface; pynvml itself is untyped."""


def utc_now() -> datetime:
    """The current time in UTC (the default clock)."""
    return datetime.now(UTC)


class _CallFailed(Exception):
    """An NVML call raised; carries the call's name for the fault message."""

    def __init__(self, call: str, error: Any) -> None:
        super().__init__(f"{call}: {error}")
        self.call = call
        self.error: Any = error


class NvmlSource:
    """A ``GpuSource`` over a pynvml-shaped module.

    The constructor calls ``nvmlInit`` and ``close`` calls ``nvmlShutdown``, so
    one source holds one reference on the library. Every method blocks; run it
    in a worker thread from async code.
    """

    def __init__(self, nvml: NvmlModule, *, clock: Clock = utc_now) -> None:
        """Initialise NVML through ``nvml``; raises ``GpuError`` if it cannot."""
        self._nvml = nvml
        self._clock = clock
        self._closed = False
        self._unsupported_codes = frozenset(
            getattr(nvml, name)
            for name in (
                "NVML_ERROR_NOT_SUPPORTED",
                "NVML_ERROR_FUNCTION_NOT_FOUND",
                "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
            )
            if hasattr(nvml, name)
        )
        self._architectures = {
            getattr(nvml, name): name.removeprefix("NVML_DEVICE_ARCH_").lower()
            for name in dir(nvml)
            if name.startswith("NVML_DEVICE_ARCH_") and name != "NVML_DEVICE_ARCH_UNKNOWN"
        }
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise GpuError(_init_failure(nvml, exc)) from exc

    @property
    def kind(self) -> str:
        """``sim`` over the simulated library, else ``nvml``: what labels call the backend."""
        from gpufleet.gpu.sim.library import SimulatedNvml

        return "sim" if isinstance(self._nvml, SimulatedNvml) else "nvml"

    @classmethod
    def real(cls, *, clock: Clock = utc_now) -> NvmlSource:
        """A source over the real NVML library (``pynvml`` from nvidia-ml-py)."""
        import pynvml

        return cls(pynvml, clock=clock)

    def __enter__(self) -> NvmlSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release this source's reference on NVML (``nvmlShutdown``); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            _log.warning("nvmlShutdown failed", extra={"nvml_error": str(exc)})

    # --- GpuSource -------------------------------------------------------------

    def devices(self) -> DeviceList:
        """Enumerate the GPUs; an unreadable GPU becomes a fault, never an exception."""
        driver_version = self._system("nvmlSystemGetDriverVersion")
        cuda = self._system("nvmlSystemGetCudaDriverVersion")
        cuda_version = None if cuda is None else _cuda_version(int(cuda))
        devices: list[GpuDevice] = []
        faults: list[GpuFault] = []
        for index in range(self._count()):
            try:
                devices.append(self._device(index, driver_version, cuda_version))
            except _CallFailed as failed:
                faults.append(self._fault(index, failed))
        return DeviceList(
            devices=tuple(devices),
            faults=tuple(faults),
            driver_version=driver_version,
            cuda_driver_version=cuda_version,
        )

    def sample(self, uuid: str) -> GpuSample:
        """Read one GPU's telemetry; raises ``GpuLostError`` if the GPU is lost."""
        with self._for_gpu(uuid):
            handle = self._handle(uuid)
            nvml = self._nvml
            utilization = self._optional("nvmlDeviceGetUtilizationRates", handle)
            memory = self._optional("nvmlDeviceGetMemoryInfo", handle)
            temperature = self._optional(
                "nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU
            )
            power = self._optional("nvmlDeviceGetPowerUsage", handle)
            power_limit = self._optional("nvmlDeviceGetEnforcedPowerLimit", handle)
            clock_sm = self._optional("nvmlDeviceGetClockInfo", handle, nvml.NVML_CLOCK_SM)
            clock_mem = self._optional("nvmlDeviceGetClockInfo", handle, nvml.NVML_CLOCK_MEM)
            ecc_corrected = self._ecc_total(handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED)
            ecc_uncorrected = self._ecc_total(handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
            retired = self._optional("nvmlDeviceGetRetiredPagesPendingStatus", handle)
            remapped = self._optional("nvmlDeviceGetRemappedRows", handle)
        return GpuSample(
            uuid=uuid,
            gpu_utilization_percent=None if utilization is None else int(utilization.gpu),
            memory_utilization_percent=None if utilization is None else int(utilization.memory),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_free_bytes=None if memory is None else int(memory.free),
            temperature_celsius=_int_or_none(temperature),
            power_usage_watts=None if power is None else int(power) / 1000,
            power_limit_watts=None if power_limit is None else int(power_limit) / 1000,
            clock_sm_mhz=_int_or_none(clock_sm),
            clock_memory_mhz=_int_or_none(clock_mem),
            ecc_corrected_total=ecc_corrected,
            ecc_uncorrected_total=ecc_uncorrected,
            retired_pages_pending=None if retired is None else retired == nvml.NVML_FEATURE_ENABLED,
            remapped_rows_failure=None if remapped is None else bool(remapped[3]),
        )

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        """The compute processes on one GPU and, in MIG mode, on each of its instances."""
        with self._for_gpu(uuid):
            handle = self._handle(uuid)
            targets: list[tuple[Any, str | None]]
            if self._mig_enabled(handle):
                targets = [
                    (mig, self._text(self._call("nvmlDeviceGetUUID", mig)))
                    for mig in self._mig_handles(handle)
                ]
            else:
                targets = [(handle, None)]
            found: list[GpuProcess] = []
            for target, mig_uuid in targets:
                running = self._optional("nvmlDeviceGetComputeRunningProcesses", target) or []
                sm_util = self._sm_utilization(target)
                found.extend(
                    GpuProcess(
                        pid=int(process.pid),
                        gpu_uuid=uuid,
                        used_memory_bytes=_int_or_none(process.usedGpuMemory),
                        sm_utilization_percent=sm_util.get(int(process.pid)),
                        mig_uuid=mig_uuid,
                    )
                    for process in running
                )
        return tuple(found)

    def xid_events(self) -> NvmlXidEventStream:
        """Register for XID events on every GPU that supports them."""
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            raise GpuError(f"nvmlEventSetCreate: {exc}") from exc
        uuids: dict[int, str] = {}
        for index in range(self._count()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = self._text(nvml.nvmlDeviceGetUUID(handle))
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
            except nvml.NVMLError as exc:
                # One GPU without events (lost, too old, vGPU) must not blind us to the others.
                _log.warning(
                    "GPU skipped for XID events",
                    extra={"gpu_index": index, "nvml_error": str(exc)},
                )
                continue
            uuids[handle_address(handle)] = uuid
        return NvmlXidEventStream(nvml, event_set, uuids, self._clock)

    # --- device identity -------------------------------------------------------

    def _device(
        self, index: int, driver_version: str | None, cuda_version: str | None
    ) -> GpuDevice:
        handle = self._call("nvmlDeviceGetHandleByIndex", index)
        mig_mode = self._optional("nvmlDeviceGetMigMode", handle)
        mig_enabled = None if mig_mode is None else mig_mode[0] == self._nvml.NVML_DEVICE_MIG_ENABLE
        memory = self._optional("nvmlDeviceGetMemoryInfo", handle)
        capability = self._optional("nvmlDeviceGetCudaComputeCapability", handle)
        architecture = self._optional("nvmlDeviceGetArchitecture", handle)
        return GpuDevice(
            index=index,
            uuid=self._text(self._call("nvmlDeviceGetUUID", handle)),
            serial=self._text_or_none(self._optional("nvmlDeviceGetSerial", handle)),
            product_name=self._text(self._call("nvmlDeviceGetName", handle)),
            pci_bus_id=_pci_bus_id(self._text(self._call("nvmlDeviceGetPciInfo", handle).busId)),
            architecture=None
            if architecture is None
            else self._architectures.get(int(architecture)),
            compute_capability=None
            if capability is None
            else (int(capability[0]), int(capability[1])),
            board_part_number=self._text_or_none(
                self._optional("nvmlDeviceGetBoardPartNumber", handle)
            ),
            vbios_version=self._text_or_none(self._optional("nvmlDeviceGetVbiosVersion", handle)),
            memory_total_bytes=None if memory is None else int(memory.total),
            driver_version=driver_version,
            cuda_driver_version=cuda_version,
            mig_mode=mig_enabled,
            mig_devices=self._mig_devices(handle) if mig_enabled else (),
            module_id=_int_or_none(self._optional("nvmlDeviceGetModuleId", handle)),
            chassis_serial=self._chassis_serial(handle),
        )

    def _mig_devices(self, handle: Any) -> tuple[MigDevice, ...]:
        found = []
        max_count = int(self._call("nvmlDeviceGetMaxMigDeviceCount", handle))
        for slot in range(max_count):
            mig = self._mig_handle(handle, slot)
            if mig is None:
                continue
            name = self._text_or_none(self._optional("nvmlDeviceGetName", mig))
            memory = self._optional("nvmlDeviceGetMemoryInfo", mig)
            found.append(
                MigDevice(
                    index=slot,
                    uuid=self._text(self._call("nvmlDeviceGetUUID", mig)),
                    gpu_instance_id=_int_or_none(self._optional("nvmlDeviceGetGpuInstanceId", mig)),
                    compute_instance_id=_int_or_none(
                        self._optional("nvmlDeviceGetComputeInstanceId", mig)
                    ),
                    # NVML names a MIG device "<product> MIG <profile>".
                    profile=name.rpartition(" MIG ")[2] if name and " MIG " in name else None,
                    memory_total_bytes=None if memory is None else int(memory.total),
                )
            )
        return tuple(found)

    def _mig_handles(self, handle: Any) -> list[Any]:
        slots = range(int(self._call("nvmlDeviceGetMaxMigDeviceCount", handle)))
        return [
            mig for mig in (self._mig_handle(handle, slot) for slot in slots) if mig is not None
        ]

    def _mig_handle(self, handle: Any, slot: int) -> Any:
        """The MIG device in ``slot``, or ``None`` for an empty slot."""
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_NOT_FOUND:
                return None
            raise _CallFailed("nvmlDeviceGetMigDeviceHandleByIndex", exc) from exc

    def _mig_enabled(self, handle: Any) -> bool:
        mode = self._optional("nvmlDeviceGetMigMode", handle)
        return mode is not None and mode[0] == self._nvml.NVML_DEVICE_MIG_ENABLE

    def _chassis_serial(self, handle: Any) -> str | None:
        """The chassis serial from platform info (GB200 and later), else ``None``."""
        info_type = getattr(self._nvml, "c_nvmlPlatformInfo_v2_t", None)
        if info_type is None or not hasattr(self._nvml, "nvmlDeviceGetPlatformInfo"):
            return None
        info = info_type()
        if self._optional("nvmlDeviceGetPlatformInfo", handle, ctypes.byref(info)) is None:
            return None
        return self._text_or_none(info.chassisSerialNumber)

    def _fault(self, index: int, failed: _CallFailed) -> GpuFault:
        lost = failed.error.value == self._nvml.NVML_ERROR_GPU_IS_LOST
        uuid, pci_bus_id = self._best_effort_identity(index)
        _log.warning(
            "GPU unreadable",
            extra={
                "gpu_index": index,
                "gpu_uuid": uuid,
                "nvml_call": failed.call,
                "nvml_error": str(failed.error),
            },
        )
        return GpuFault(
            index=index,
            kind=FaultKind.LOST if lost else FaultKind.ERROR,
            message=str(failed),
            uuid=uuid,
            pci_bus_id=pci_bus_id,
        )

    def _best_effort_identity(self, index: int) -> tuple[str | None, str | None]:
        """Whatever NVML still says about an unreadable GPU, to tell the operator which one."""
        nvml = self._nvml
        uuid = pci_bus_id = None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError:
            return None, None
        with suppress(nvml.NVMLError):
            uuid = self._text_or_none(nvml.nvmlDeviceGetUUID(handle))
        with suppress(nvml.NVMLError):
            pci_bus_id = _pci_bus_id(self._text(nvml.nvmlDeviceGetPciInfo(handle).busId))
        return uuid, pci_bus_id

    # --- telemetry -------------------------------------------------------------

    def _ecc_total(self, handle: Any, error_type: int) -> int | None:
        total = self._optional(
            "nvmlDeviceGetTotalEccErrors", handle, error_type, self._nvml.NVML_VOLATILE_ECC
        )
        return _int_or_none(total)

    def _sm_utilization(self, handle: Any) -> dict[int, int]:
        """pid -> latest SM utilization; empty where NVML has no samples for this device."""
        nvml = self._nvml
        try:
            # Time stamp 0 asks for every sample still in the driver's buffer.
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, 0)
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_NOT_FOUND or exc.value in self._unsupported_codes:
                return {}
            raise _CallFailed("nvmlDeviceGetProcessUtilization", exc) from exc
        latest: dict[int, tuple[int, int]] = {}
        for sample in samples:
            pid, stamp = int(sample.pid), int(sample.timeStamp)
            if pid not in latest or stamp >= latest[pid][0]:
                latest[pid] = (stamp, int(sample.smUtil))
        return {pid: util for pid, (_, util) in latest.items()}

    # --- NVML call helpers -----------------------------------------------------

    def _call(self, name: str, *args: Any) -> Any:
        """Call an NVML function; any NVML error becomes ``_CallFailed`` naming it."""
        nvml = self._nvml
        try:
            return getattr(nvml, name)(*args)
        except nvml.NVMLError as exc:
            raise _CallFailed(name, exc) from exc

    def _optional(self, name: str, *args: Any) -> Any:
        """Like ``_call``, but ``None`` where the GPU or driver does not support it."""
        nvml = self._nvml
        function = getattr(nvml, name, None)
        if function is None:
            return None
        try:
            return function(*args)
        except nvml.NVMLError as exc:
            if exc.value in self._unsupported_codes:
                return None
            raise _CallFailed(name, exc) from exc

    def _system(self, name: str) -> str | None:
        """A system-wide value; a failure is logged and reported as unknown."""
        try:
            value = self._optional(name)
        except _CallFailed as failed:
            _log.warning(
                "NVML system query failed",
                extra={"nvml_call": name, "nvml_error": str(failed.error)},
            )
            return None
        return None if value is None else self._text(value)

    def _count(self) -> int:
        try:
            return int(self._call("nvmlDeviceGetCount"))
        except _CallFailed as failed:
            raise GpuError(str(failed)) from failed.error

    def _handle(self, uuid: str) -> Any:
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError as exc:
            if exc.value in (nvml.NVML_ERROR_NOT_FOUND, nvml.NVML_ERROR_INVALID_ARGUMENT):
                raise GpuError(f"{uuid}: no such GPU") from exc
            raise _CallFailed("nvmlDeviceGetHandleByUUID", exc) from exc

    @contextmanager
    def _for_gpu(self, uuid: str) -> Iterator[None]:
        """Turn a failed call on one GPU into ``GpuLostError`` or ``GpuError``."""
        try:
            yield
        except _CallFailed as failed:
            if failed.error.value == self._nvml.NVML_ERROR_GPU_IS_LOST:
                raise GpuLostError(uuid, f"{failed.call}: GPU is lost") from failed.error
            raise GpuError(f"{uuid}: {failed}") from failed.error

    @staticmethod
    def _text(value: Any) -> str:
        # Older pynvml releases return bytes where newer ones return str.
        return value.decode() if isinstance(value, bytes) else str(value)

    def _text_or_none(self, value: Any) -> str | None:
        text = None if value is None else self._text(value)
        return text or None


def _init_failure(nvml: NvmlModule, exc: Any) -> str:
    if exc.value == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return "NVML library (libnvidia-ml.so.1) not found: is the NVIDIA driver installed here?"
    if exc.value == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return "the NVIDIA kernel driver is not loaded (nvmlInit: Driver Not Loaded)"
    if exc.value == nvml.NVML_ERROR_NO_PERMISSION:
        return "no permission to open the NVIDIA devices (nvmlInit: Insufficient Permissions)"
    return f"nvmlInit failed: {exc}"


def _pci_bus_id(raw: str) -> str:
    """``0000:18:00.0`` or ``00000000:18:00.0`` (any case) -> ``00000000:18:00.0``."""
    domain, sep, rest = raw.strip().partition(":")
    if not sep:
        return raw.strip().upper()
    return f"{domain.zfill(8)}:{rest}".upper()


def _cuda_version(value: int) -> str:
    """NVML's ``12040`` -> ``12.4``."""
    return f"{value // 1000}.{value % 1000 // 10}"


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
