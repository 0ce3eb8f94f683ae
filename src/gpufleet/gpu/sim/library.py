"""``SimulatedNvml``: an object with the function surface of nvidia-ml-py's ``pynvml``.

Every function has pynvml's name, signature and return shape, and failures are
pynvml's own ``NVMLError_*`` classes, so ``NvmlSource`` runs unchanged on top of
it. Where pynvml returns a ctypes struct, so does the simulator (the same
struct class). Handles are real ctypes pointers that are never dereferenced
(``handles.py``), and the event sets behind ``nvmlEventSet*`` are kept by
``events.py``.
"""

from __future__ import annotations

import ctypes
import inspect
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pynvml

from gpufleet.gpu.sim.events import SUPPORTED_EVENTS, EventSets
from gpufleet.gpu.sim.fleet import SimError, SimFleet, SimGpu, SimProcess
from gpufleet.gpu.sim.handles import device_handle, device_of

_UINT_NOT_AVAILABLE = 0xFFFF_FFFF

_ARCHITECTURES = {
    "kepler": pynvml.NVML_DEVICE_ARCH_KEPLER,
    "maxwell": pynvml.NVML_DEVICE_ARCH_MAXWELL,
    "pascal": pynvml.NVML_DEVICE_ARCH_PASCAL,
    "volta": pynvml.NVML_DEVICE_ARCH_VOLTA,
    "turing": pynvml.NVML_DEVICE_ARCH_TURING,
    "ampere": pynvml.NVML_DEVICE_ARCH_AMPERE,
    "ada": pynvml.NVML_DEVICE_ARCH_ADA,
    "hopper": pynvml.NVML_DEVICE_ARCH_HOPPER,
    "blackwell": pynvml.NVML_DEVICE_ARCH_BLACKWELL,
}

# What real NVML answers on a MIG device handle; everything else is NotSupported.
_MIG_HANDLE_CALLS = frozenset(
    {
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetName",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetArchitecture",
        "nvmlDeviceGetCudaComputeCapability",
        "nvmlDeviceIsMigDeviceHandle",
        "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
        "nvmlDeviceGetGpuInstanceId",
        "nvmlDeviceGetComputeInstanceId",
        "nvmlDeviceGetComputeRunningProcesses",
    }
)


def _error(code: int) -> Exception:
    # NVMLError.__new__ maps the code to its subclass (NVMLError_NotSupported...).
    error: Exception = pynvml.NVMLError(code)
    return error


@dataclass(frozen=True, slots=True)
class _Device:
    """A resolved handle: a GPU and, for a MIG device handle, the instance slot."""

    index: int
    gpu: SimGpu
    mig: int | None


class SimulatedNvml:
    """A simulated NVML library over a mutable ``SimFleet``.

    Use it wherever ``pynvml`` is expected. The constants and error classes of
    pynvml (``NVML_*``, ``NVMLError*``, ``nvmlEventType*``, ``c_nvml*`` structs)
    are available as attributes, as on the real module.

    Besides the NVML surface it has an injection API (``inject_xid``,
    ``add_process``, ``remove_process``, ``set_lost``, ``set_unsupported``,
    ``set_error``) for
    tests; ``fleet`` can also be changed directly (e.g. a GPU's temperature).
    It is thread-safe: ``nvmlEventSetWait`` blocks in one thread while another
    injects.
    """

    def __init__(self, fleet: SimFleet, *, clock_us: Callable[[], int] | None = None) -> None:
        """Simulate ``fleet``; ``clock_us`` stamps process-utilization samples."""
        check_function_names(name for gpu in fleet.gpus for name in gpu.unsupported)
        check_function_names(name for gpu in fleet.gpus for name in gpu.errors)
        self.fleet = fleet
        self._clock_us = clock_us or (lambda: time.time_ns() // 1000)
        self._lock = threading.Lock()
        self._init_count = 0
        self._events = EventSets()

    # --- injection API -------------------------------------------------------

    def gpu(self, ref: int | str) -> SimGpu:
        """The simulated GPU with this index or UUID."""
        for index, gpu in enumerate(self.fleet.gpus):
            if ref == index or ref == gpu.uuid:
                return gpu
        raise SimError(f"no simulated GPU {ref!r}")

    def inject_xid(self, ref: int | str, xid: int, *, mig_index: int | None = None) -> int:
        """Raise XID ``xid`` on a GPU; returns how many event sets it was delivered to.

        It reaches every event set that registered this GPU for
        ``nvmlEventTypeXidCriticalError`` before the call, like the real driver.
        """
        gpu = self.gpu(ref)
        index = self.fleet.gpus.index(gpu)
        if mig_index is None:
            gi = ci = _UINT_NOT_AVAILABLE
        else:
            instance = gpu.mig_instances[mig_index]
            gi, ci = instance.gpu_instance_id, instance.compute_instance_id
        return self._events.deliver(index, pynvml.nvmlEventTypeXidCriticalError, xid, gi, ci)

    def add_process(
        self,
        ref: int | str,
        pid: int,
        *,
        used_memory_bytes: int | None = None,
        sm_util_percent: int | None = None,
        mig_index: int | None = None,
    ) -> SimProcess:
        """Start a simulated compute process on a GPU (or on one of its MIG instances)."""
        gpu = self.gpu(ref)
        if mig_index is not None and not 0 <= mig_index < len(gpu.mig_instances):
            raise SimError(f"GPU {gpu.uuid} has no MIG instance {mig_index}")
        process = SimProcess(pid, used_memory_bytes, sm_util_percent, mig_index)
        with self._lock:
            gpu.processes.append(process)
        return process

    def remove_process(self, ref: int | str, pid: int) -> None:
        """End the simulated process ``pid`` on a GPU."""
        gpu = self.gpu(ref)
        with self._lock:
            kept = [process for process in gpu.processes if process.pid != pid]
            if len(kept) == len(gpu.processes):
                raise SimError(f"no process {pid} on GPU {gpu.uuid}")
            gpu.processes = kept

    def set_lost(self, ref: int | str, lost: bool = True) -> None:
        """Make a GPU fall off the bus: every call on its handles raises GpuIsLost."""
        self.gpu(ref).lost = lost

    def set_unsupported(self, ref: int | str, *functions: str) -> None:
        """Make the named NVML functions raise NotSupported on one GPU."""
        check_function_names(functions)
        self.gpu(ref).unsupported.update(functions)

    def set_error(self, ref: int | str, function: str, error_code: int) -> None:
        """Make one NVML function raise ``NVMLError(error_code)`` on one GPU."""
        check_function_names([function])
        self.gpu(ref).errors[function] = error_code

    # --- internals -----------------------------------------------------------

    def _check_init(self) -> None:
        if self._init_count == 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _device(self, call: str, handle: object) -> _Device:
        """Resolve a handle for ``call``, raising what NVML would raise instead."""
        self._check_init()
        if not isinstance(handle, pynvml.c_nvmlDevice_t):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        index, mig = device_of(handle)
        if not 0 <= index < len(self.fleet.gpus):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.fleet.gpus[index]
        if mig is not None and not (gpu.mig_enabled and mig < len(gpu.mig_instances)):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if gpu.lost:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if call in gpu.errors:
            raise _error(gpu.errors[call])
        if call in gpu.unsupported or (mig is not None and call not in _MIG_HANDLE_CALLS):
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return _Device(index, gpu, mig)

    @staticmethod
    def _value(value: Any) -> Any:
        """A fleet value, or NotSupported where the fleet says ``None``."""
        if value is None:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    # --- library lifecycle and system queries --------------------------------

    def nvmlInit(self) -> None:
        """Initialise the library (reference counted, like NVML)."""
        with self._lock:
            self._init_count += 1

    def nvmlInitWithFlags(self, flags: int) -> None:
        """Initialise the library; flags are accepted and ignored."""
        self.nvmlInit()

    def nvmlShutdown(self) -> None:
        """Release one ``nvmlInit``."""
        with self._lock:
            self._check_init()
            self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        """The driver version, e.g. ``550.54.15``."""
        self._check_init()
        return self.fleet.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        """The CUDA driver version as an int, e.g. ``12040``."""
        self._check_init()
        return self.fleet.cuda_driver_version

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        """Same as ``nvmlSystemGetCudaDriverVersion``."""
        return self.nvmlSystemGetCudaDriverVersion()

    def nvmlDeviceGetCount(self) -> int:
        """How many GPUs there are, lost ones included."""
        self._check_init()
        return len(self.fleet.gpus)

    # --- handles ---------------------------------------------------------------

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        """A handle for GPU ``index``; a lost GPU still gets one (its calls fail)."""
        self._check_init()
        if not 0 <= index < len(self.fleet.gpus):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return device_handle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> Any:
        """A handle for a GPU or MIG device UUID."""
        self._check_init()
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for index, gpu in enumerate(self.fleet.gpus):
            mig_uuids = [m.uuid for m in gpu.mig_instances] if gpu.mig_enabled else []
            if wanted != gpu.uuid and wanted not in mig_uuids:
                continue
            if gpu.lost:
                raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
            mig = mig_uuids.index(wanted) if wanted in mig_uuids else None
            return device_handle(index, mig)
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByPciBusId(self, pciBusId: str | bytes) -> Any:
        """A handle for a PCI bus id (any case, 4- or 8-digit domain)."""
        self._check_init()
        wanted = pciBusId.decode() if isinstance(pciBusId, bytes) else pciBusId
        for index, gpu in enumerate(self.fleet.gpus):
            if int(gpu.pci_bus_id.split(":")[0], 16) == int(wanted.split(":")[0], 16) and (
                gpu.pci_bus_id.split(":", 1)[1].upper() == wanted.split(":", 1)[1].upper()
            ):
                if gpu.lost:
                    raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
                return device_handle(index)
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    # --- identity -------------------------------------------------------------

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        """The NVML index of a GPU."""
        return self._device("nvmlDeviceGetIndex", handle).index

    def nvmlDeviceGetName(self, handle: Any) -> str:
        """The product name; MIG devices get NVML's ``<name> MIG <profile>`` form."""
        device = self._device("nvmlDeviceGetName", handle)
        if device.mig is not None:
            return f"{device.gpu.name} MIG {device.gpu.mig_instances[device.mig].profile}"
        return device.gpu.name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        """The GPU (``GPU-...``) or MIG device (``MIG-...``) UUID."""
        device = self._device("nvmlDeviceGetUUID", handle)
        if device.mig is not None:
            return device.gpu.mig_instances[device.mig].uuid
        return device.gpu.uuid

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        """The board serial."""
        return str(self._value(self._device("nvmlDeviceGetSerial", handle).gpu.serial))

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        """A ``nvmlPciInfo_t``, as ``nvmlDeviceGetPciInfo_v3``."""
        return self._pci_info("nvmlDeviceGetPciInfo", handle)

    def nvmlDeviceGetPciInfo_v3(self, handle: Any) -> Any:
        """A ``nvmlPciInfo_t`` with ``busId`` in ``00000000:18:00.0`` form."""
        return self._pci_info("nvmlDeviceGetPciInfo_v3", handle)

    def _pci_info(self, call: str, handle: Any) -> Any:
        bus_id = self._device(call, handle).gpu.pci_bus_id
        domain, bus, rest = bus_id.split(":")
        device = rest.split(".")[0]
        info = pynvml.nvmlPciInfo_t()
        info.busId = bus_id
        info.busIdLegacy = f"{int(domain, 16):04X}:{bus}:{rest}"
        info.domain = int(domain, 16)
        info.bus = int(bus, 16)
        info.device = int(device, 16)
        return info

    def nvmlDeviceGetArchitecture(self, handle: Any) -> int:
        """An ``NVML_DEVICE_ARCH_*`` constant."""
        architecture = self._device("nvmlDeviceGetArchitecture", handle).gpu.architecture
        return int(_ARCHITECTURES[self._value(architecture)])

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        """``(major, minor)``."""
        gpu = self._device("nvmlDeviceGetCudaComputeCapability", handle).gpu
        major, minor = self._value(gpu.compute_capability)
        return (major, minor)

    def nvmlDeviceGetBoardPartNumber(self, handle: Any) -> str:
        """The board part number, e.g. ``692-2G520-0200-000``."""
        gpu = self._device("nvmlDeviceGetBoardPartNumber", handle).gpu
        return str(self._value(gpu.board_part_number))

    def nvmlDeviceGetVbiosVersion(self, handle: Any) -> str:
        """The VBIOS version."""
        gpu = self._device("nvmlDeviceGetVbiosVersion", handle).gpu
        return str(self._value(gpu.vbios_version))

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        """A ``c_nvmlMemory_t`` (or ``c_nvmlMemory_v2_t`` when ``version`` is given)."""
        device = self._device("nvmlDeviceGetMemoryInfo", handle)
        if device.mig is not None:
            instance = device.gpu.mig_instances[device.mig]
            total, used = instance.memory_total_bytes, instance.memory_used_bytes
        else:
            total, used = self._value(device.gpu.memory_total_bytes), device.gpu.memory_used_bytes
        memory = pynvml.c_nvmlMemory_v2_t() if version else pynvml.c_nvmlMemory_t()
        if version:
            memory.version = version
        memory.total, memory.used, memory.free = total, used, total - used
        return memory

    def nvmlDeviceGetModuleId(self, handle: Any, moduleId: Any = None) -> Any:
        """The module id on HGX/GB200 boards; fills ``moduleId`` if given by reference."""
        gpu = self._device("nvmlDeviceGetModuleId", handle).gpu
        module_id = self._value(gpu.module_id)
        target = getattr(moduleId, "_obj", None)
        if target is not None:
            target.value = module_id
            return pynvml.NVML_SUCCESS
        return module_id

    def nvmlDeviceGetPlatformInfo(self, handle: Any, platformInfo: Any) -> int:
        """Fill a ``c_nvmlPlatformInfo_v1_t``/``_v2_t`` passed by reference (GB200)."""
        gpu = self._device("nvmlDeviceGetPlatformInfo", handle).gpu
        info = getattr(platformInfo, "_obj", platformInfo)
        chassis_serial = self._value(gpu.chassis_serial)
        module_id = bytes([gpu.module_id or 0])
        if isinstance(info, pynvml.c_nvmlPlatformInfo_v2_t):
            info.chassisSerialNumber = chassis_serial
            info.slotNumber = bytes([1])
            info.trayIndex = bytes([1])
            info.hostId = bytes([1])
        elif not isinstance(info, pynvml.c_nvmlPlatformInfo_v1_t):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        info.moduleId = module_id
        return int(pynvml.NVML_SUCCESS)

    # --- MIG -------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        """``[current, pending]`` as ``NVML_DEVICE_MIG_ENABLE``/``_DISABLE``."""
        gpu = self._device("nvmlDeviceGetMigMode", handle).gpu
        if not gpu.mig_capable:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceIsMigDeviceHandle(self, handle: Any) -> ctypes.c_uint:
        """A ``c_uint`` (as pynvml returns it) that is true for MIG device handles."""
        device = self._device("nvmlDeviceIsMigDeviceHandle", handle)
        return ctypes.c_uint(0 if device.mig is None else 1)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: Any) -> Any:
        """The parent GPU's handle."""
        device = self._device("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", migDevice)
        if device.mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return device_handle(device.index)

    def nvmlDeviceGetMaxMigDeviceCount(self, device: Any) -> int:
        """How many MIG device slots the GPU has."""
        resolved = self._device("nvmlDeviceGetMaxMigDeviceCount", device)
        if resolved.mig is not None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not resolved.gpu.mig_capable:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return resolved.gpu.max_mig_devices

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: Any, index: int) -> Any:
        """The MIG device in slot ``index``; an empty slot raises NotFound."""
        resolved = self._device("nvmlDeviceGetMigDeviceHandleByIndex", device)
        gpu = resolved.gpu
        if resolved.mig is not None or not 0 <= index < gpu.max_mig_devices:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not gpu.mig_capable:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not gpu.mig_enabled or index >= len(gpu.mig_instances):
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        return device_handle(resolved.index, index)

    def nvmlDeviceGetGpuInstanceId(self, device: Any) -> int:
        """The GPU instance id of a MIG device."""
        resolved = self._device("nvmlDeviceGetGpuInstanceId", device)
        if resolved.mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return resolved.gpu.mig_instances[resolved.mig].gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, device: Any) -> int:
        """The compute instance id of a MIG device."""
        resolved = self._device("nvmlDeviceGetComputeInstanceId", device)
        if resolved.mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return resolved.gpu.mig_instances[resolved.mig].compute_instance_id

    # --- telemetry -------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        """A ``c_nvmlUtilization_t``; NotSupported in MIG mode, as on real GPUs."""
        gpu = self._device("nvmlDeviceGetUtilizationRates", handle).gpu
        if gpu.mig_enabled:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        utilization = pynvml.c_nvmlUtilization_t()
        utilization.gpu = self._value(gpu.utilization_gpu_percent)
        utilization.memory = self._value(gpu.utilization_memory_percent)
        return utilization

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        """The GPU core temperature in °C (``NVML_TEMPERATURE_GPU`` only)."""
        gpu = self._device("nvmlDeviceGetTemperature", handle).gpu
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(self._value(gpu.temperature_celsius))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        """Power draw in milliwatts."""
        gpu = self._device("nvmlDeviceGetPowerUsage", handle).gpu
        return int(self._value(gpu.power_usage_milliwatts))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        """The enforced power limit in milliwatts."""
        gpu = self._device("nvmlDeviceGetEnforcedPowerLimit", handle).gpu
        return int(self._value(gpu.power_limit_milliwatts))

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        """The power management limit in milliwatts."""
        gpu = self._device("nvmlDeviceGetPowerManagementLimit", handle).gpu
        return int(self._value(gpu.power_limit_milliwatts))

    def nvmlDeviceGetClockInfo(self, handle: Any, type: int) -> int:
        """The current clock in MHz for ``NVML_CLOCK_GRAPHICS``/``SM``/``MEM``/``VIDEO``."""
        gpu = self._device("nvmlDeviceGetClockInfo", handle).gpu
        clocks = {
            pynvml.NVML_CLOCK_GRAPHICS: gpu.clock_sm_mhz,
            pynvml.NVML_CLOCK_SM: gpu.clock_sm_mhz,
            pynvml.NVML_CLOCK_VIDEO: gpu.clock_sm_mhz,
            pynvml.NVML_CLOCK_MEM: gpu.clock_memory_mhz,
        }
        if type not in clocks:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(self._value(clocks[type]))

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int:
        """Total ECC errors of a type; volatile and aggregate counters agree here."""
        gpu = self._device("nvmlDeviceGetTotalEccErrors", handle).gpu
        counts = {
            pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: gpu.ecc_corrected_errors,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: gpu.ecc_uncorrected_errors,
        }
        if errorType not in counts or counterType not in (
            pynvml.NVML_VOLATILE_ECC,
            pynvml.NVML_AGGREGATE_ECC,
        ):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(self._value(counts[errorType]))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, device: Any) -> int:
        """``NVML_FEATURE_ENABLED`` when retired pages wait for a reboot."""
        gpu = self._device("nvmlDeviceGetRetiredPagesPendingStatus", device).gpu
        pending = self._value(gpu.retired_pages_pending)
        return int(pynvml.NVML_FEATURE_ENABLED if pending else pynvml.NVML_FEATURE_DISABLED)

    def nvmlDeviceGetRemappedRows(self, device: Any) -> tuple[int, int, int, int]:
        """``(correctable, uncorrectable, pending, failure_occurred)``."""
        gpu = self._device("nvmlDeviceGetRemappedRows", device).gpu
        failure = self._value(gpu.remapped_rows_failure)
        return (
            gpu.remapped_rows_correctable,
            gpu.remapped_rows_uncorrectable,
            int(gpu.remapped_rows_pending),
            int(failure),
        )

    # --- processes -------------------------------------------------------------

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        """Processes as pynvml's friendly objects (``pid``, ``usedGpuMemory``, GI/CI ids).

        On a GPU handle every process of the GPU is listed; on a MIG device
        handle only the processes of that instance.
        """
        device = self._device("nvmlDeviceGetComputeRunningProcesses", handle)
        with self._lock:
            processes = list(device.gpu.processes)
        result = []
        for process in processes:
            if device.mig is not None and process.mig_index != device.mig:
                continue
            info = pynvml.c_nvmlProcessInfo_v3_t()
            info.pid = process.pid
            info.usedGpuMemory = (
                pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
                if process.used_memory_bytes is None
                else process.used_memory_bytes
            )
            if process.mig_index is None:
                info.gpuInstanceId = info.computeInstanceId = _UINT_NOT_AVAILABLE
            else:
                instance = device.gpu.mig_instances[process.mig_index]
                info.gpuInstanceId = instance.gpu_instance_id
                info.computeInstanceId = instance.compute_instance_id
            friendly = pynvml.nvmlStructToFriendlyObject(info)
            # pynvml turns "not available" into None the same way.
            if friendly.usedGpuMemory == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
                friendly.usedGpuMemory = None
            result.append(friendly)
        return result

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any) -> list[Any]:
        """Same as ``nvmlDeviceGetComputeRunningProcesses``."""
        return self.nvmlDeviceGetComputeRunningProcesses(handle)

    def nvmlDeviceGetProcessUtilization(self, handle: Any, timeStamp: int) -> list[Any]:
        """``c_nvmlProcessUtilizationSample_t`` samples newer than ``timeStamp`` (µs).

        Raises NotFound when there is no sample, and NotSupported in MIG mode.
        """
        gpu = self._device("nvmlDeviceGetProcessUtilization", handle).gpu
        if gpu.mig_enabled:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        now = self._clock_us()
        samples = []
        with self._lock:
            processes = list(gpu.processes)
        for process in processes:
            if process.sm_util_percent is None or now <= timeStamp:
                continue
            sample = pynvml.c_nvmlProcessUtilizationSample_t()
            sample.pid = process.pid
            sample.timeStamp = now
            sample.smUtil = process.sm_util_percent
            samples.append(sample)
        if not samples:
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        return samples

    # --- events ----------------------------------------------------------------

    def nvmlEventSetCreate(self) -> Any:
        """A new, empty event set."""
        self._check_init()
        return self._events.create()

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        """The event type mask the GPU can deliver."""
        self._device("nvmlDeviceGetSupportedEventTypes", handle)
        return int(SUPPORTED_EVENTS)

    def nvmlDeviceRegisterEvents(self, handle: Any, eventTypes: int, eventSet: Any) -> None:
        """Deliver events of ``eventTypes`` from this GPU to ``eventSet``."""
        device = self._device("nvmlDeviceRegisterEvents", handle)
        if eventTypes & ~SUPPORTED_EVENTS:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        self._events.register(eventSet, device.index, eventTypes)

    def nvmlEventSetWait(self, eventSet: Any, timeoutms: int) -> Any:
        """The next event as a ``c_nvmlEventData_t``; raises ``NVMLError_Timeout``."""
        return self.nvmlEventSetWait_v2(eventSet, timeoutms)

    def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> Any:
        """Same as ``nvmlEventSetWait``."""
        self._check_init()
        return self._events.wait(eventSet, timeoutms / 1000)

    def nvmlEventSetFree(self, eventSet: Any) -> None:
        """Release an event set; a thread waiting on it is woken with InvalidArgument."""
        self._check_init()
        self._events.free(eventSet)


_REEXPORTED_PREFIXES = ("NVML_", "NVMLError", "nvmlEventType", "c_nvml", "nvmlPlatformInfo_v")
for _name in dir(pynvml):
    if _name.startswith(_REEXPORTED_PREFIXES) or _name in ("nvmlPciInfo_t", "nvmlFriendlyObject"):
        setattr(SimulatedNvml, _name, getattr(pynvml, _name))


def check_function_names(names: Iterable[str]) -> None:
    """Raise ``SimError`` for a name that is not an NVML function of the simulator."""
    unknown = sorted(
        name
        for name in names
        if not (name.startswith("nvml") and inspect.isfunction(getattr(SimulatedNvml, name, None)))
    )
    if unknown:
        raise SimError(f"not NVML functions of the simulator: {', '.join(unknown)}")
