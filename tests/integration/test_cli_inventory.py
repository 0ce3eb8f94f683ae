"""End to end: the installed ``gpufleet`` command, run as a subprocess."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from gpufleet.inventory.reading import Reading
from tests.integration.cli_support import gpufleet


def test_scan_dgx_h100_to_stdout_prints_eight_json_readings_and_nothing_else() -> None:
    result = gpufleet("inventory", "scan", "--simulate", "dgx-h100", "--exporter", "stdout",
                      "--machine-id", "i-1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    readings = [Reading.from_dict(json.loads(line)) for line in result.stdout.splitlines()]
    assert len(readings) == 8
    assert len({r.gpu for r in readings}) == 8
    assert {r.cluster for r in readings} == {"test-cluster"}


def test_scan_logs_go_to_stderr_as_json_lines() -> None:
    result = gpufleet("inventory", "scan", "--simulate", "l4", "--machine-id", "i-1")
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(r["msg"] == "scan complete" and r["service"] for r in records)


def scan_to_db(db: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = gpufleet("inventory", "scan", "--exporter", "sqlite", "--db", str(db), *extra)
    assert result.returncode == 0, result.stderr
    return result


def test_scanning_twice_adds_readings_and_updates_last_seen_without_new_placements(
    tmp_path: Path,
) -> None:
    db = tmp_path / "inv.db"
    scan_to_db(db, "--simulate", "dgx-h100", "--machine-id", "i-1")
    with sqlite3.connect(db) as conn:
        first = dict(conn.execute("SELECT uuid, last_seen FROM placements").fetchall())
    scan_to_db(db, "--simulate", "dgx-h100", "--machine-id", "i-1")
    with sqlite3.connect(db) as conn:
        readings = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
        second = dict(conn.execute("SELECT uuid, last_seen FROM placements").fetchall())
    assert readings == 16
    assert second.keys() == first.keys()
    assert len(second) == 8
    assert all(second[u] > first[u] for u in first)


def test_history_moved_finds_gpus_after_they_move_to_another_machine(tmp_path: Path) -> None:
    db = tmp_path / "inv.db"
    scan_to_db(db, "--simulate", "dgx-h100", "--seed", "1", "--machine-id", "i-1")
    scan_to_db(db, "--simulate", "dgx-h100", "--seed", "2", "--machine-id", "i-2")
    result = gpufleet("inventory", "history", "--db", str(db), "--moved", "--json")
    assert json.loads(result.stdout) == []
    scan_to_db(db, "--simulate", "dgx-h100", "--seed", "1", "--machine-id", "i-3")
    result = gpufleet("inventory", "history", "--db", str(db), "--moved", "--json")
    moved = json.loads(result.stdout)
    assert len({p["gpu"] for p in moved}) == 8
    assert {p["machine"] for p in moved} == {"i-1", "i-3"}


def test_history_by_gpu_prints_a_table(tmp_path: Path) -> None:
    db = tmp_path / "inv.db"
    scan_to_db(db, "--simulate", "l4", "--machine-id", "i-7")
    (row,) = json.loads(gpufleet("inventory", "history", "--db", str(db), "--machine", "i-7",
                                 "--json").stdout)  # fmt: skip
    result = gpufleet("inventory", "history", "--db", str(db), "--gpu", row["gpu"])
    assert result.returncode == 0
    assert "i-7" in result.stdout


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"EXPORTER_TYPE": "nope"}, "EXPORTER_TYPE"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"CLUSTER_NAME": ""}, "CLUSTER_NAME"),
    ],
)
def test_invalid_configuration_exits_non_zero_with_one_line_naming_the_variable(
    env: dict[str, str], variable: str
) -> None:
    result = gpufleet("inventory", "scan", "--simulate", "l4", env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert result.stdout == ""


def test_no_source_chosen_is_one_clear_line() -> None:
    result = gpufleet("inventory", "scan")
    assert result.returncode == 2
    assert "choose exactly one GPU source" in result.stderr


def test_gpu_smi_simulate_prints_nvidia_smi_xml() -> None:
    result = gpufleet("gpu", "smi", "--simulate", "gb200")
    assert result.returncode == 0, result.stderr
    assert result.stdout.lstrip().startswith("<?xml")
    assert result.stdout.count("<gpu id=") == 4


def test_scan_reads_a_saved_nvidia_smi_document(tmp_path: Path) -> None:
    xml = tmp_path / "smi.xml"
    xml.write_text(gpufleet("gpu", "smi", "--simulate", "dgx-a100").stdout)
    result = gpufleet("inventory", "scan", "--smi-xml", str(xml), "--machine-id", "i-1")
    readings = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(readings) == 8
    assert {r["source"] for r in readings} == {"nvidia-smi"}


def test_gpu_list_prints_every_serial() -> None:
    listed = json.loads(gpufleet("gpu", "list", "--simulate", "dgx-h100", "--json").stdout)
    table = gpufleet("gpu", "list", "--simulate", "dgx-h100").stdout
    assert all(d["serial"] in table for d in listed["devices"])


def test_history_reads_the_database_named_by_sqlite_path(tmp_path: Path) -> None:
    db = tmp_path / "inv.db"
    scan_to_db(db, "--simulate", "l4", "--machine-id", "i-9")
    result = gpufleet("inventory", "history", "--machine", "i-9", "--json",
                      env={"SQLITE_PATH": str(db)})  # fmt: skip
    assert [p["machine"] for p in json.loads(result.stdout)] == ["i-9"]


def test_history_without_a_question_is_one_clear_line(tmp_path: Path) -> None:
    result = gpufleet("inventory", "history", "--db", str(tmp_path / "x.db"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "gpufleet: error: ask exactly one of --gpu, --machine, --node or --moved"
    )


@pytest.mark.parametrize(
    "command",
    [["gpu", "list"], ["inventory", "scan"], ["device-api", "provider"], ["exporter"]],
    ids=lambda c: " ".join(c),
)
def test_a_fleet_file_that_is_not_utf8_is_one_line_naming_it(
    tmp_path: Path, command: list[str]
) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_bytes(b'preset: l4\ngpus:\n  0: {product: "L4 \xff\xfe"}\n')
    result = gpufleet(*command, "--fleet", str(fleet), env={"LOG_LEVEL": "error"})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(fleet) in lines[0]
    assert "not a UTF-8 text file" in lines[0]


@pytest.mark.parametrize("cluster", ["", "   ", "\t"])
def test_a_blank_cluster_name_is_refused(cluster: str) -> None:
    result = gpufleet("inventory", "scan", "--simulate", "l4", "--cluster", cluster)
    assert result.returncode == 2, result.stderr
    assert "CLUSTER_NAME" in result.stderr
    assert "blank" in result.stderr
    assert result.stdout == ""


def test_a_cluster_name_is_stored_without_surrounding_blanks() -> None:
    result = gpufleet(
        "inventory", "scan", "--simulate", "l4", "--cluster", " prod ", "-e", "stdout"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["cluster"] == "prod"


@pytest.mark.parametrize(
    "source",
    [["--smi-xml", "x.xml"], ["--fleet", "fleet.yaml"], ["--nvml"]],
    ids=lambda s: s[0],
)
@pytest.mark.parametrize("command", [["gpu", "list"], ["inventory", "scan"]], ids=" ".join)
def test_seed_without_simulate_is_refused(command: list[str], source: list[str]) -> None:
    result = gpufleet(*command, *source, "--seed", "3")
    assert result.returncode == 2, result.stderr
    assert "--seed applies only to --simulate" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "command",
    [["gpu", "list"], ["inventory", "scan"], ["gpu", "smi"], ["inventory", "agent"]],
    ids=" ".join,
)
def test_an_unknown_preset_exits_2_naming_the_presets(command: list[str]) -> None:
    result = gpufleet(*command, "--simulate", "dgx-nope", env={"LOG_LEVEL": "error"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "unknown preset 'dgx-nope'" in lines[0]
    assert "dgx-h100" in lines[0]
