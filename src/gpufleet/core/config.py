"""Settings from environment variables first, CLI flags on top.

Each feature declares one settings model by subclassing `GpufleetSettings`; its
fields are read from environment variables named like the field upper-cased, so
gpuid manifests (`CLUSTER_NAME`, `EXPORTER_TYPE`, `TIMEOUT=30s`, ...) keep working.
`load_settings` turns every validation failure into one `ConfigError` line that
names the variable the way the user spells it.
"""

from __future__ import annotations

import enum
import math
import os
import re
import types
import typing
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasPath,
    BeforeValidator,
    Field,
    Secret,
    SecretBytes,
    SecretStr,
    ValidationError,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from gpufleet.core.errors import ConfigError

__all__ = [
    "CaseInsensitiveEnum",
    "CommonSettings",
    "Duration",
    "GpufleetSettings",
    "LogFormat",
    "LogLevel",
    "NonBlank",
    "load_settings",
    "parse_duration",
]

_DURATION_HINT = "expected a duration like 30s, 500ms, 2m, 1h or 1m30s, or a number of seconds"

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # Go accepts both the micro sign and the Greek mu
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
# Longest units first, so `ms` is not read as `m` followed by garbage.
_UNITS = "|".join(sorted(_UNIT_SECONDS, key=len, reverse=True))
_DURATION_PART = re.compile(rf"({_NUMBER})({_UNITS})")
_DURATION_FULL = re.compile(rf"(?:{_NUMBER}(?:{_UNITS}))+")
_PLAIN_NUMBER = re.compile(rf"[+]?{_NUMBER}")


def parse_duration(text: str | float) -> float:
    """Parse a Go-style duration (`30s`, `500ms`, `1m30s`) or plain seconds into seconds.

    Raises ValueError with a message fit for the user when the text is not a
    non-negative, finite duration.
    """
    if isinstance(text, bool):
        # bool is an int subclass; `TIMEOUT=true` is a mistake, not one second.
        raise ValueError(_DURATION_HINT)
    if isinstance(text, int | float):
        return _checked_seconds(float(text))
    if not isinstance(text, str):
        raise ValueError(_DURATION_HINT)
    value = text.strip()
    if value.startswith("-"):
        raise ValueError("expected a non-negative duration")
    if _PLAIN_NUMBER.fullmatch(value):
        return _checked_seconds(float(value))
    if not _DURATION_FULL.fullmatch(value):
        raise ValueError(_DURATION_HINT)
    total = sum(
        float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(value)
    )
    return _checked_seconds(total)


def _checked_seconds(seconds: float) -> float:
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(_DURATION_HINT)
    if seconds < 0:
        raise ValueError("expected a non-negative duration")
    return seconds


def _validate_duration(value: object) -> float:
    if isinstance(value, str | int | float):
        return parse_duration(value)
    raise ValueError(_DURATION_HINT)


Duration = Annotated[float, BeforeValidator(_validate_duration)]


def _not_blank(value: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError("must not be empty or blank")
    return stripped


NonBlank = Annotated[str, AfterValidator(_not_blank)]
"""A name such as a cluster or node: surrounding whitespace is dropped, and nothing else left
is an error (``--cluster '  '`` would otherwise label every reading with spaces)."""


def check_http_url(value: str) -> str:
    """``value`` stripped, if it is an http:// or https:// URL with a host and a valid port."""
    value = value.strip()
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"expected an http:// or https:// URL ({exc})") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    return value


HttpUrlText = Annotated[str, AfterValidator(check_http_url)]
"""An http(s) URL kept as text (endpoints are passed on to clients as strings)."""
"""Seconds as a float, written as `30s`, `500ms`, `2m`, `1h`, `1m30s` or a plain number."""


class CaseInsensitiveEnum(enum.StrEnum):
    """A string enum that also accepts its values in any case (`INFO`, `Json`)."""

    @classmethod
    def _missing_(cls, value: object) -> CaseInsensitiveEnum | None:
        if isinstance(value, str):
            wanted = value.strip().lower()
            for member in cls:
                if member.value == wanted:
                    return member
        return None


class LogLevel(CaseInsensitiveEnum):
    """How much to log; `warn` is accepted as an alias of `warning` (gpuid uses it)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @classmethod
    def _missing_(cls, value: object) -> LogLevel | None:
        if isinstance(value, str) and value.strip().lower() == "warn":
            return cls.WARNING
        member = super()._missing_(value)
        return member if isinstance(member, LogLevel) else None


class LogFormat(CaseInsensitiveEnum):
    """Log line format: JSON lines for machines, text for people."""

    JSON = "json"
    TEXT = "text"


class GpufleetSettings(BaseSettings):
    """Base of every feature's settings model: fields come from same-named env variables."""

    model_config = SettingsConfigDict(
        env_prefix="",
        case_sensitive=False,
        extra="ignore",
        populate_by_name=True,
    )


class CommonSettings(GpufleetSettings):
    """Settings every gpufleet process has: `LOG_LEVEL` and `LOG_FORMAT`."""

    log_level: LogLevel = Field(default=LogLevel.INFO, description="debug, info, warning or error")
    log_format: LogFormat = Field(default=LogFormat.JSON, description="json or text")


S = TypeVar("S", bound=GpufleetSettings)


def load_settings(cls: type[S], /, **overrides: object) -> S:
    """Build `cls` from the environment, with CLI flag values in `overrides` on top.

    An override whose value is None means the flag was not given and leaves the
    environment's value in place. An override naming no field of `cls` is a
    programming error and raises TypeError. Invalid or missing values raise
    `ConfigError` whose message is one line naming each bad variable.
    """
    known = _field_lookup(cls)
    unknown = sorted(name for name in overrides if name not in known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(cls, exc)) from exc
    except SettingsError as exc:
        raise ConfigError(_describe_settings_error(cls, exc)) from exc


def _field_lookup(cls: type[GpufleetSettings]) -> dict[str, tuple[str, FieldInfo]]:
    """Map each field's name and aliases to (field name, field info)."""
    lookup: dict[str, tuple[str, FieldInfo]] = {}
    for name, info in cls.model_fields.items():
        lookup[name] = (name, info)
        for alias in _aliases(info):
            lookup.setdefault(alias, (name, info))
    return lookup


def _aliases(info: FieldInfo) -> list[str]:
    aliases: list[str] = []
    candidates: list[object] = [info.validation_alias, info.alias]
    for candidate in candidates:
        if isinstance(candidate, str):
            aliases.append(candidate)
        elif isinstance(candidate, AliasChoices):
            aliases.extend(choice for choice in candidate.choices if isinstance(choice, str))
        elif isinstance(candidate, AliasPath) and isinstance(candidate.path[0], str):
            aliases.append(candidate.path[0])
    return aliases


def _env_name(cls: type[GpufleetSettings], name: str, info: FieldInfo) -> str:
    """The environment variable the user sets for a field, as they would spell it."""
    aliases = _aliases(info)
    if aliases:
        # pydantic-settings reads an aliased field from its alias, without the prefix.
        return aliases[0].upper()
    prefix = str(cls.model_config.get("env_prefix", ""))
    return f"{prefix}{name}".upper()


def _describe_validation_error(cls: type[GpufleetSettings], exc: ValidationError) -> str:
    known = _field_lookup(cls)
    problems = [_describe_error(cls, known, error) for error in exc.errors()]
    return "; ".join(problems)


def _describe_error(
    cls: type[GpufleetSettings],
    known: dict[str, tuple[str, FieldInfo]],
    error: ErrorDetails,
) -> str:
    loc = error["loc"]
    head = str(loc[0]) if loc else ""
    if head not in known:
        # A model-level validator (no location) or something naming no field:
        # its input is the whole settings dict, other fields' secrets included,
        # so only the message is shown. The validator's message names the
        # variables involved.
        if head and error["type"] == "missing":
            return f"missing required {head.upper()}"
        message = _message(error)
        return f"invalid {head.upper()}: {message}" if head else message
    name, info = known[head]
    variable = _env_name(cls, name, info)
    if error["type"] == "missing":
        return f"missing required {variable}"
    shown = "'**********'" if _is_secret(info.annotation) else repr(error["input"])
    return f"invalid {variable}={shown}: {_expected(error, info.annotation)}"


def _is_secret(annotation: object) -> bool:
    """Whether a field holds a secret (`SecretStr`, `SecretBytes`, optional or not)."""
    if isinstance(annotation, type) and issubclass(annotation, Secret | SecretStr | SecretBytes):
        return True
    return any(_is_secret(arg) for arg in typing.get_args(annotation))


def _message(error: ErrorDetails) -> str:
    """The validator's own message, without pydantic's `Value error, ` prefix."""
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _expected(error: ErrorDetails, annotation: object) -> str:
    choices = _choices(annotation)
    if error["type"] in {"literal_error", "enum"} and choices:
        return "expected one of " + ", ".join(repr(choice) for choice in choices)
    message = _message(error)
    if message.startswith("Input should be "):
        return "expected " + message.removeprefix("Input should be ")
    return message[:1].lower() + message[1:]


def _choices(annotation: object) -> list[object]:
    """The allowed values of a Literal or Enum annotation, looking through Optional."""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [member.value for member in annotation]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        found: list[object] = []
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                found.extend(_choices(arg))
        return found
    return []


_SETTINGS_ERROR_FIELD = re.compile(r'field "([^"]+)"')


def _describe_settings_error(cls: type[GpufleetSettings], exc: SettingsError) -> str:
    """Explain a value pydantic-settings could not even decode (bad JSON for a list, ...)."""
    match = _SETTINGS_ERROR_FIELD.search(str(exc))
    known = _field_lookup(cls)
    if match is None or match.group(1) not in known:
        return f"invalid configuration: {exc}"
    name, info = known[match.group(1)]
    variable = _env_name(cls, name, info)
    raw = _environ_value(variable)
    reason = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
    shown = f"={raw!r}" if raw is not None else ""
    return f"invalid {variable}{shown}: expected a JSON value{reason}"


def _environ_value(variable: str) -> str | None:
    # The models are case-insensitive, so `exporter_type=...` counts as EXPORTER_TYPE.
    for key, value in os.environ.items():
        if key.upper() == variable:
            return value
    return None
