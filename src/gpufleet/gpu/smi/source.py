"""``SmiXmlSource``: an ``nvidia-smi -q -x`` document behind the ``GpuSource`` interface.

It lets an inventory scan, or any feature, read a saved or exec'd document like
a live GPU source. The document is a snapshot: it has no event stream.
"""

from __future__ import annotations

import os

from gpufleet.gpu.model import DeviceList, GpuProcess, GpuSample
from gpufleet.gpu.smi.parse import SmiReport, parse_smi_xml
from gpufleet.gpu.source import GpuError, XidEventStream


class SmiXmlSource:
    """A ``GpuSource`` over one parsed ``nvidia-smi -q -x`` document.

    Give it the document (``data``) or a file (``path``); it is parsed at once, so
    a bad document fails here with :class:`SmiParseError`, not on first use.
    """

    kind = "smi"
    """What labels call this backend (``NvmlSource.kind`` is ``nvml`` or ``sim``)."""

    def __init__(
        self,
        data: bytes | str | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        origin: str | None = None,
    ) -> None:
        if data is not None and path is not None:
            raise ValueError("give SmiXmlSource data or path, not both")
        if data is not None:
            document = data
        elif path is not None:
            origin = origin or os.fspath(path)
            document = _read(path, origin)
        else:
            raise ValueError("give SmiXmlSource data or path")
        self.origin = origin or "<input>"
        self.report: SmiReport = parse_smi_xml(document, origin=self.origin)
        self._samples = {sample.uuid: sample for sample in self.report.samples}

    def devices(self) -> DeviceList:
        """The GPUs the document lists."""
        return self.report.devices

    def sample(self, uuid: str) -> GpuSample:
        """The telemetry the document holds for GPU ``uuid``."""
        try:
            return self._samples[uuid]
        except KeyError:
            raise GpuError(f"{self.origin}: no GPU {uuid} in nvidia-smi XML") from None

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        """The compute processes the document lists on GPU ``uuid`` and its MIG devices."""
        self.sample(uuid)  # an unknown GPU is an error, not an empty list
        return tuple(p for p in self.report.processes if p.gpu_uuid == uuid)

    def xid_events(self) -> XidEventStream:
        """Always raises: a document is a snapshot, with no events to wait for."""
        raise GpuError("nvidia-smi XML has no event stream")

    def close(self) -> None:
        """Nothing to release."""


def _read(path: str | os.PathLike[str], origin: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise GpuError(f"{origin}: cannot read nvidia-smi XML: {exc.strerror}") from exc
