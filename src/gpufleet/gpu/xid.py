"""The XID catalogue: what each XID means, how bad it is, and what to do about it.

One data module, so the whole policy can be read (and reviewed) in one table.
Each entry has a description, a **severity** that decides what a health
provider does with the event, and an **action**, NVIDIA's "immediate action"
resolution bucket from its XID catalogue (docs.nvidia.com/deploy/xid-errors)
mapped onto the device API's ``recommended_action`` strings:

===================  ====================
NVIDIA bucket        ``Action``
===================  ====================
IGNORE               ``NONE``
RESTART_APP          ``RESTART_WORKLOAD``
RESET_GPU            ``RESET_GPU``
RESTART_BM           ``REBOOT_NODE``
CONTACT_SUPPORT      ``REPLACE_GPU``
===================  ====================

Severities:

- ``IGNORED``: application-level XIDs (13, 31, 43, 45, 68, 109, the set NVIDIA's
  k8s-device-plugin skips). The GPU is fine; the workload that caused it failed.
- ``WARNING``: recorded in the GPU's recent XIDs, health unchanged.
- ``CRITICAL``: the GPU is unhealthy and the action is recommended.

An XID that is not in the table is a ``WARNING`` with action ``NONE`` and the
description ``unknown XID n``: worth recording, not worth draining a node for.

Overrides (``XID_OVERRIDES``) use one syntax, inline or in a YAML file::

    XID_OVERRIDES="48=critical:reset-gpu,13=warning,94=critical"
    XID_OVERRIDES=/etc/gpufleet/xid-overrides.yaml   # {48: "critical:reset-gpu", 13: warning}

Each entry is ``XID=SEVERITY[:ACTION]``; severity is ``ignored``, ``warning`` or
``critical``; action is ``none``, ``restart-workload``, ``reset-gpu``,
``reboot-node`` or ``replace-gpu`` (the proto spelling ``ResetGpu`` is accepted
too). Without an action the catalogue's action for that XID is kept.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import yaml

from gpufleet.core.errors import ConfigError

__all__ = [
    "DEFAULT_CATALOGUE",
    "Action",
    "Severity",
    "XidCatalogue",
    "XidInfo",
    "XidOverride",
    "load_overrides",
    "parse_overrides",
]


class Severity(enum.StrEnum):
    """How a health provider treats an XID."""

    IGNORED = "ignored"
    """Application-level: no status change at all."""
    WARNING = "warning"
    """Recorded in the GPU's recent XIDs; health unchanged."""
    CRITICAL = "critical"
    """The GPU becomes ``Healthy=False`` with the recommended action."""


class Action(enum.StrEnum):
    """What an operator (or automation) should do; values are the proto's strings."""

    NONE = "None"
    RESTART_WORKLOAD = "RestartWorkload"
    RESET_GPU = "ResetGpu"
    REBOOT_NODE = "RebootNode"
    REPLACE_GPU = "ReplaceGpu"

    @property
    def rank(self) -> int:
        """How disruptive the action is: a larger rank includes the smaller ones."""
        return _ACTION_RANK[self]

    @classmethod
    def parse(cls, text: str) -> Action:
        """``reset-gpu``, ``reset_gpu`` or ``ResetGpu`` -> ``RESET_GPU``; ValueError otherwise."""
        key = _squash(text)
        for action in cls:
            if _squash(action.value) == key:
                return action
        known = ", ".join(_kebab(action.value) for action in cls)
        raise ValueError(f"unknown action {text.strip()!r} (expected one of {known})")


_ACTION_RANK = {
    Action.NONE: 0,
    Action.RESTART_WORKLOAD: 1,
    Action.RESET_GPU: 2,
    Action.REBOOT_NODE: 3,
    Action.REPLACE_GPU: 4,
}


def _squash(text: str) -> str:
    return re.sub(r"[-_\s]", "", text).lower()


def _kebab(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", camel).lower()


@dataclass(frozen=True, slots=True)
class XidInfo:
    """One catalogue entry."""

    xid: int
    description: str
    severity: Severity
    action: Action


# (xid, description, severity, immediate action). Descriptions follow NVIDIA's
# catalogue; 63 and 64 are worded as NVIDIA words them (NVSentinel got them wrong).
_I, _W, _C = Severity.IGNORED, Severity.WARNING, Severity.CRITICAL
_TABLE: tuple[tuple[int, str, Severity, Action], ...] = (
    (8, "GPU stopped processing (channel idle timeout)", _W, Action.RESTART_WORKLOAD),
    (13, "Graphics engine exception", _I, Action.RESTART_WORKLOAD),
    (31, "GPU memory page fault", _I, Action.RESTART_WORKLOAD),
    (32, "Invalid or corrupted push buffer stream", _W, Action.RESTART_WORKLOAD),
    (38, "Driver firmware error", _C, Action.RESET_GPU),
    (43, "GPU stopped processing (channel reset after an application error)", _I, Action.NONE),
    (45, "Preemptive cleanup, due to previous errors", _I, Action.NONE),
    (48, "Double bit ECC error (DBE)", _C, Action.RESET_GPU),
    (61, "Internal micro-controller breakpoint or warning", _C, Action.RESET_GPU),
    (62, "Internal micro-controller halt", _C, Action.RESET_GPU),
    (
        63,
        "ECC page retirement or row remapping recorded (takes effect after a GPU reset)",
        _C,
        Action.RESET_GPU,
    ),
    (64, "ECC page retirement or row remapping failed", _C, Action.REPLACE_GPU),
    (68, "NVDEC0 exception (video decoder)", _I, Action.RESTART_WORKLOAD),
    (69, "Graphics engine class error", _W, Action.RESTART_WORKLOAD),
    (74, "NVLink error", _C, Action.RESET_GPU),
    (79, "GPU has fallen off the bus", _C, Action.REBOOT_NODE),
    (92, "High single-bit ECC error rate", _W, Action.NONE),
    # Contained: only the workload that touched the bad memory is affected; the
    # row remap it triggers shows up as 63 and in the periodic health check.
    (94, "Contained ECC error", _W, Action.RESTART_WORKLOAD),
    (95, "Uncontained ECC error", _C, Action.RESET_GPU),
    (109, "Context switch timeout", _I, Action.RESTART_WORKLOAD),
    (119, "GSP RPC timeout", _C, Action.RESET_GPU),
    (120, "GSP error", _C, Action.RESET_GPU),
    (121, "C2C link corrected error", _W, Action.NONE),
    (140, "Unrecovered ECC error", _C, Action.RESET_GPU),
    (143, "GPU initialization failure", _C, Action.RESET_GPU),
    (144, "NVLink SAW MVB error", _C, Action.RESET_GPU),
    (145, "NVLink RLW error", _C, Action.RESET_GPU),
    (146, "NVLink TLW error", _C, Action.RESET_GPU),
    (147, "NVLink TREX error", _C, Action.RESET_GPU),
    (148, "NVLink NVLPW control error", _C, Action.RESET_GPU),
    (149, "NVLink NETIR error", _C, Action.RESET_GPU),
    (150, "NVLink MSE error", _C, Action.RESET_GPU),
)


@dataclass(frozen=True, slots=True)
class XidOverride:
    """A configured change to one entry: the severity, and optionally the action."""

    xid: int
    severity: Severity
    action: Action | None = None


class XidCatalogue:
    """XID -> ``XidInfo``, with a documented default for unknown XIDs.

    Immutable: ``with_overrides`` returns a new catalogue.
    """

    def __init__(self, entries: Mapping[int, XidInfo]) -> None:
        """A catalogue of ``entries`` (keyed by XID)."""
        for xid, info in entries.items():
            if xid != info.xid:
                raise ValueError(f"catalogue key {xid} holds the entry for XID {info.xid}")
        self._entries: Mapping[int, XidInfo] = MappingProxyType(dict(entries))

    @classmethod
    def default(cls) -> XidCatalogue:
        """The built-in table."""
        return cls({xid: XidInfo(xid, text, sev, act) for xid, text, sev, act in _TABLE})

    def lookup(self, xid: int) -> XidInfo:
        """The entry for ``xid``; unknown XIDs are a WARNING with action NONE."""
        found = self._entries.get(xid)
        if found is not None:
            return found
        return XidInfo(xid, f"unknown XID {xid}", Severity.WARNING, Action.NONE)

    def with_overrides(
        self, overrides: Mapping[int, XidOverride] | list[XidOverride]
    ) -> XidCatalogue:
        """A copy with ``overrides`` applied on top (unknown XIDs become known)."""
        items = overrides.values() if isinstance(overrides, Mapping) else overrides
        entries = dict(self._entries)
        for override in items:
            base = self.lookup(override.xid)
            entries[override.xid] = replace(
                base,
                severity=override.severity,
                action=base.action if override.action is None else override.action,
            )
        return XidCatalogue(entries)

    def ignored(self) -> frozenset[int]:
        """The XIDs that change nothing."""
        return frozenset(xid for xid, info in self._entries.items() if info.severity is _I)

    def critical(self) -> frozenset[int]:
        """The XIDs that make a GPU unhealthy."""
        return frozenset(xid for xid, info in self._entries.items() if info.severity is _C)

    def __iter__(self) -> Iterator[XidInfo]:
        return iter(sorted(self._entries.values(), key=lambda info: info.xid))

    def __len__(self) -> int:
        return len(self._entries)


DEFAULT_CATALOGUE = XidCatalogue.default()


_ENTRY = re.compile(r"^\s*(\d+)\s*=\s*([A-Za-z]+)\s*(?::\s*([A-Za-z_-]+)\s*)?$")


def _parse_value(xid: int, value: str) -> XidOverride:
    """``critical:reset-gpu`` for ``xid``; ValueError naming the XID if malformed."""
    severity_text, _, action_text = value.partition(":")
    try:
        severity = Severity(severity_text.strip().lower())
    except ValueError:
        raise ValueError(
            f"unknown severity {severity_text.strip()!r} for XID {xid} "
            "(expected ignored, warning or critical)"
        ) from None
    action = None
    if action_text.strip():
        try:
            action = Action.parse(action_text)
        except ValueError as exc:
            raise ValueError(f"{exc} for XID {xid}") from None
    return XidOverride(xid, severity, action)


def _parse_inline(text: str) -> list[XidOverride]:
    found: dict[int, XidOverride] = {}
    for raw in text.split(","):
        if not raw.strip():
            continue
        match = _ENTRY.match(raw)
        if match is None:
            raise ValueError(
                f"bad entry {raw.strip()!r} (expected XID=SEVERITY[:ACTION], "
                "e.g. 48=critical:reset-gpu)"
            )
        xid = int(match.group(1))
        if xid in found:
            raise ValueError(f"duplicate entry for XID {xid}")
        value = match.group(2) + (f":{match.group(3)}" if match.group(3) else "")
        found[xid] = _parse_value(xid, value)
    return list(found.values())


def _parse_yaml(path: Path) -> list[XidOverride]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ValueError(f"{path}: invalid YAML ({first})") from None
    if document is None:
        return []
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping of XID to 'severity[:action]'")
    found: list[XidOverride] = []
    for key, value in document.items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ValueError(f"{path}: key {key!r} is not an XID number")
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected 'severity[:action]' for XID {key}, got {value!r}")
        try:
            found.append(_parse_value(key, value))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return found


def parse_overrides(value: str) -> list[XidOverride]:
    """Overrides from ``XID_OVERRIDES``: the inline syntax, or a YAML file path.

    A value ending in ``.yaml``/``.yml``, or naming an existing file, is read as
    YAML; anything else is parsed inline. Raises ``ValueError`` with a one-line
    message naming the bad entry (and the file): settings validation reports it
    against the variable.
    """
    text = value.strip()
    if not text:
        return []
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or ("=" not in text and path.is_file()):
        return _parse_yaml(path)
    return _parse_inline(text)


def load_overrides(value: str, *, variable: str = "XID_OVERRIDES") -> list[XidOverride]:
    """Like ``parse_overrides``, but a failure is a ``ConfigError`` naming ``variable``."""
    try:
        return parse_overrides(value)
    except ValueError as exc:
        raise ConfigError(f"invalid {variable}: {exc}") from None
