"""nvidia-smi as a GPU source: parse and write ``nvidia-smi -q -x`` and ``--query-gpu`` CSV.

* :func:`parse_smi_xml` (``parse``) reads a ``-q -x`` document into a :class:`SmiReport`;
* :func:`parse_smi_csv` (``query``) reads ``--query-gpu`` CSV into :class:`GpuDevice` records;
* :func:`write_smi_xml` (``write``) renders a realistic document from the model
  (simulated nodes answer ``nvidia-smi -q -x`` with it), with
  :func:`smi_stderr_lines` for the GPUs it leaves out;
* :func:`smi_visible` (``visible``) says what a parse of that document gives back;
* :class:`SmiXmlSource` (``source``) puts a document behind the ``GpuSource`` interface;
* ``_values`` holds how nvidia-smi spells values, shared by all of them.
"""

from gpufleet.gpu.smi._values import MIB, SmiParseError, mig_uuid_for
from gpufleet.gpu.smi.parse import SmiReport, parse_smi_xml
from gpufleet.gpu.smi.query import DEFAULT_QUERY_FIELDS, parse_smi_csv, smi_query_command
from gpufleet.gpu.smi.source import SmiXmlSource
from gpufleet.gpu.smi.visible import smi_visible
from gpufleet.gpu.smi.write import smi_stderr_lines, write_smi_xml

__all__ = [
    "DEFAULT_QUERY_FIELDS",
    "MIB",
    "SmiParseError",
    "SmiReport",
    "SmiXmlSource",
    "mig_uuid_for",
    "parse_smi_csv",
    "parse_smi_xml",
    "smi_query_command",
    "smi_stderr_lines",
    "smi_visible",
    "write_smi_xml",
]
