"""Logs are JSON lines (or text) on stderr with time, level, msg, service, source, context."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.core.logging import bind, configure_logging

log = logging.getLogger("gpufleet.test")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("aiohttp.access", "asyncio")}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines(stream)]


def test_logs_go_to_stderr_and_never_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("inventory")
    log.warning("scan started")
    captured = capsys.readouterr()
    assert (captured.out, json.loads(captured.err)["msg"]) == ("", "scan started")


def test_json_line_carries_level_msg_and_service(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    log.info("found %d gpus", 8)
    record = records(stream)[0]
    assert (record["level"], record["msg"], record["service"]) == (
        "info",
        "found 8 gpus",
        "inventory",
    )


def test_json_time_is_rfc3339_utc_with_milliseconds(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    log.info("tick")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(records(stream)[0]["time"]))


def test_json_source_names_the_calling_function_file_and_line(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    log.info("here")
    line = test_json_source_names_the_calling_function_file_and_line.__code__.co_firstlineno + 2
    assert records(stream)[0]["source"] == {
        "function": "test_json_source_names_the_calling_function_file_and_line",
        "file": __file__,
        "line": line,
    }


def test_context_fields_from_extra_are_top_level_keys(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    log.info("gpu seen", extra={"node": "n1", "gpu_index": 3})
    record = records(stream)[0]
    assert (record["node"], record["gpu_index"]) == ("n1", 3)


def test_context_values_that_are_not_json_are_written_with_str(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    log.info("wrote", extra={"path": Path("/var/spool/x.json")})
    assert records(stream)[0]["path"] == "/var/spool/x.json"


def test_context_field_cannot_overwrite_the_service(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    log.info("spoof", extra={"service": "other"})
    assert records(stream)[0]["service"] == "inventory"


def test_exception_is_one_line_with_error_and_traceback_fields(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    try:
        raise ConnectionError("sink unreachable")
    except ConnectionError:
        log.exception("delivery failed")
    (record,) = records(stream)
    assert record["error"] == "ConnectionError: sink unreachable"


def test_exception_traceback_is_a_single_string_field(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    try:
        raise ConnectionError("sink unreachable")
    except ConnectionError:
        log.exception("delivery failed")
    traceback_text = str(records(stream)[0]["traceback"])
    assert traceback_text.startswith("Traceback (most recent call last):")


def test_level_filters_lower_records(stream: io.StringIO) -> None:
    configure_logging("inventory", level="warning", stream=stream)
    log.info("quiet")
    log.warning("loud")
    assert [record["msg"] for record in records(stream)] == ["loud"]


def test_level_accepts_warn_in_any_case(stream: io.StringIO) -> None:
    configure_logging("inventory", level="WARN", stream=stream)
    assert logging.getLogger().level == logging.WARNING


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="loud"):
        configure_logging("inventory", level="loud")


def test_configuring_twice_replaces_the_previous_handler(stream: io.StringIO) -> None:
    first = io.StringIO()
    configure_logging("inventory", stream=first)
    configure_logging("inventory", stream=stream)
    log.info("once")
    assert (lines(first), len(lines(stream))) == ([], 1)


def test_configuring_leaves_foreign_handlers_in_place() -> None:
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    configure_logging("inventory", stream=io.StringIO())
    assert foreign in logging.getLogger().handlers


def test_noisy_third_party_loggers_are_capped_at_warning(stream: io.StringIO) -> None:
    configure_logging("inventory", level="info", stream=stream)
    logging.getLogger("aiohttp.access").info("GET /metrics 200")
    assert lines(stream) == []


def test_debug_level_lets_third_party_loggers_through(stream: io.StringIO) -> None:
    configure_logging("inventory", level="info", stream=io.StringIO())
    configure_logging("inventory", level="debug", stream=stream)
    logging.getLogger("asyncio").debug("selector")
    assert len(lines(stream)) == 1


def test_text_format_is_a_human_line_with_key_values(stream: io.StringIO) -> None:
    configure_logging("inventory", fmt="text", stream=stream)
    log.info("gpu seen", extra={"node": "n1", "model": "NVIDIA H100"})
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO  gpu seen node=n1 model=\"NVIDIA H100\"",
        lines(stream)[0],
    )


def test_bind_adds_fields_to_every_line(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    bound = bind(log, node="n1")
    bound.info("first")
    bound.info("second", extra={"gpu_index": 2})
    assert [(r["node"], r.get("gpu_index")) for r in records(stream)] == [("n1", None), ("n1", 2)]


def test_a_context_error_is_kept_when_there_is_no_exception(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    log.warning("pod processing failed; retrying", extra={"error": "exec timed out", "attempt": 1})
    record = records(stream)[0]
    assert (record["error"], record["attempt"]) == ("exec timed out", 1)


def test_the_exception_wins_over_a_context_error(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    try:
        raise KeyError("gpu-3")
    except KeyError:
        log.exception("crashed", extra={"error": "context"})
    assert records(stream)[0]["error"] == "KeyError: 'gpu-3'"


def test_a_context_traceback_is_never_taken_for_the_real_one(stream: io.StringIO) -> None:
    configure_logging("inventory", stream=stream)
    log.warning("odd", extra={"traceback": "fake"})
    assert "traceback" not in records(stream)[0]
