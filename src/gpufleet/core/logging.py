"""Logging set-up: JSON lines (or human text) on stderr, never stdout.

stdout carries data (`gpufleet inventory` records, `gpu smi` XML), so logs must
stay out of it. A JSON line holds `time`, `level`, `msg`, `service`, `source`
and every context field given through `extra={...}`; a failure's traceback is a
single string field, so one failure is one line. `error` is the exception
(`Type: message`) when the record has one, else the `error` context field.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

from gpufleet.core.config import LogFormat, LogLevel

__all__ = ["JsonFormatter", "TextFormatter", "bind", "configure_logging"]

# Libraries that log every request or poll; quiet unless the user asks for debug.
NOISY_LOGGERS = ("aiohttp.access", "botocore", "urllib3", "asyncio")
# Libraries whose records carry whole URLs and headers (upload state tokens, presigned
# queries, auth challenges): warning at every level, debug included. Our clients log
# their own requests at debug, with the query stripped.
SECRET_BEARING_LOGGERS = ("httpx", "httpcore")

_LEVELS = {
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}

# Every attribute a bare LogRecord carries; anything else on a record came from `extra`.
_BARE_RECORD = logging.LogRecord("", logging.INFO, "", 0, "", None, None)
_RECORD_ATTRIBUTES = frozenset(vars(_BARE_RECORD)) | {"message", "asctime", "taskName"}

_CORE_FIELDS = frozenset({"time", "level", "msg", "service", "source", "traceback"})


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


def _jsonable(value: object) -> object:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


def _error_fields(record: logging.LogRecord) -> dict[str, str]:
    fields: dict[str, str] = {}
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        fields["error"] = f"{type(error).__name__}: {error}"
        fields["traceback"] = "".join(traceback.format_exception(error)).rstrip("\n")
    if record.stack_info:
        fields["stack"] = record.stack_info
    return fields


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render `record`; context fields never overwrite the core fields.

        `error` is a context field like any other (the reason on a retry or
        give-up line) unless the record carries an exception: then the
        exception's `Type: message` wins.
        """
        line: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "service": self.service,
            "source": {
                "function": record.funcName,
                "file": record.pathname,
                "line": record.lineno,
            },
        }
        line.update(_error_fields(record))
        for key, value in _context(record).items():
            if key not in _CORE_FIELDS:
                line.setdefault(key, _jsonable(value))
        return json.dumps(line, ensure_ascii=False)


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(_jsonable(value), ensure_ascii=False)
    if text == "" or any(char in text for char in ' "=\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """Formats a record for people: `2026-11-24T00:00:00.000Z INFO  msg key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record`; a traceback follows on its own lines, as people expect."""
        parts = [_timestamp(record), f"{record.levelname:<5}", record.getMessage()]
        errors = _error_fields(record)
        parts.extend(
            f"{key}={_text_value(value)}"
            for key, value in _context(record).items()
            if key not in errors  # the exception's error wins, as in JSON
        )
        if "error" in errors:
            parts.append(f"error={_text_value(errors['error'])}")
        text = " ".join(parts)
        if "traceback" in errors:
            text += "\n" + errors["traceback"]
        if "stack" in errors:
            text += "\n" + errors["stack"]
        return text


class _GpufleetHandler(logging.StreamHandler[TextIO]):
    """Marks the handler configure_logging installed, so a second call replaces it."""


def configure_logging(
    service: str,
    level: str = "info",
    fmt: str = "json",
    stream: TextIO | None = None,
) -> None:
    """Send the root logger's records to stderr (or `stream`) as JSON lines or text.

    Calling it again replaces the handler it installed before and leaves other
    handlers (pytest's, for instance) alone. `level` is debug, info, warning
    (or warn) or error in any case; `fmt` is json or text. Raises ValueError for
    anything else.
    """
    log_level = LogLevel(level)
    log_format = LogFormat(fmt)
    formatter: logging.Formatter = (
        JsonFormatter(service) if log_format is LogFormat.JSON else TextFormatter()
    )
    # Resolved per call, not at import, so a redirected sys.stderr is honoured.
    handler = _GpufleetHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _GpufleetHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(_LEVELS[log_level])

    noisy_level = logging.NOTSET if log_level is LogLevel.DEBUG else logging.WARNING
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(noisy_level)
    for name in SECRET_BEARING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class _BoundLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds fixed context fields to every record; per-call `extra` wins on a clash."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        bound: Mapping[str, object] = self.extra or {}
        kwargs["extra"] = {**bound, **(kwargs.get("extra") or {})}
        return msg, kwargs


def bind(logger: logging.Logger, **fields: object) -> logging.LoggerAdapter[logging.Logger]:
    """A logger that adds `fields` (node, gpu, pod, ...) as context to every line."""
    return _BoundLogger(logger, fields)
