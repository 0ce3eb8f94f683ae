"""``scripts/image/sbom.py``: a CycloneDX SBOM of exactly what a wheel directory installs.

Real wheels (two tiny packages written here), a real throwaway venv, the real
``cyclonedx-py`` (dev extra): no network (``--no-index``) and no server, a few
seconds per SBOM. Here rather than in tests/unit because the floor venv, which
runs tests/unit, has no dev tools. The pure parts: tests/unit/test_image_sbom_refs.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "image" / "sbom.py"
_EPOCH = (1980, 1, 1, 0, 0, 0)


def make_wheel(directory: Path, name: str, version: str, requires: Sequence[str] = ()) -> Path:
    """A pure-Python wheel of ``name`` ``version`` (one module) that requires ``requires``."""
    dist = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nLicense: MIT\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{dist}/METADATA": metadata,
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            data = text.encode()
            archive.writestr(zipfile.ZipInfo(member, _EPOCH), data)
            hashed = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{member},sha256={hashed.decode()},{len(data)}")
        record.append(f"{dist}/RECORD,,")
        archive.writestr(zipfile.ZipInfo(f"{dist}/RECORD", _EPOCH), "\n".join(record) + "\n")
    return path


def write_wheels(directory: Path, dep_version: str = "1.0.1") -> Path:
    directory.mkdir()
    make_wheel(directory, "tinyapp", "1.2.3", ["tinydep>=1.0"])
    make_wheel(directory, "tinydep", dep_version)
    make_wheel(directory, "unrelated", "9.9")  # in the directory, not required: not in the SBOM
    return directory


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wheels(tmp_path_factory.mktemp("wheels") / "wheels")


def run_sbom(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, env=full_env, timeout=300, check=False,
    )  # fmt: skip


def sbom_of(wheels: Path, output: Path, *extra: str, env: dict[str, str] | None = None) -> bytes:
    done = run_sbom("--wheels", str(wheels), "--output", str(output), *extra, env=env)
    assert done.returncode == 0, done.stderr
    return output.read_bytes()


@pytest.fixture(scope="module")
def two_runs(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """The SBOM of ``tinyapp`` from the same wheels, made twice (each in a venv of its own)."""
    out = tmp_path_factory.mktemp("sbom")
    first = sbom_of(wheels, out / "a.json", "--package", "tinyapp")
    return first, sbom_of(wheels, out / "b.json", "--package", "tinyapp")


def components(document: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["version"] for item in document["components"]}


def test_the_sbom_lists_what_the_wheels_install_with_versions(
    two_runs: tuple[bytes, bytes],
) -> None:
    document = json.loads(two_runs[0])
    assert document["bomFormat"] == "CycloneDX"
    assert tuple(map(int, document["specVersion"].split("."))) >= (1, 5)
    assert components(document) == {"tinyapp": "1.2.3", "tinydep": "1.0.1"}
    graph = {entry["ref"]: entry.get("dependsOn", []) for entry in document["dependencies"]}
    assert graph["tinyapp==1.2.3"] == ["tinydep==1.0.1"]


def test_the_callers_pythonpath_does_not_leak_into_the_sbom(wheels: Path, tmp_path: Path) -> None:
    # A package visible only through the caller's PYTHONPATH is not in the image.
    leaked = tmp_path / "leaked"
    (leaked / "intruder-9.9.dist-info").mkdir(parents=True)
    (leaked / "intruder-9.9.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: intruder\nVersion: 9.9\n"
    )
    output = tmp_path / "sbom.json"
    leak = {"PYTHONPATH": str(leaked)}
    document = json.loads(sbom_of(wheels, output, "--package", "tinyapp", env=leak))
    assert components(document) == {"tinyapp": "1.2.3", "tinydep": "1.0.1"}


def test_two_runs_give_the_same_bytes(two_runs: tuple[bytes, bytes]) -> None:
    assert two_runs[0] == two_runs[1]


def test_the_serial_number_follows_the_content(
    two_runs: tuple[bytes, bytes], tmp_path: Path
) -> None:
    before = json.loads(two_runs[0])
    newer = write_wheels(tmp_path / "wheels", dep_version="1.0.2")
    after = json.loads(sbom_of(newer, tmp_path / "b.json", "--package", "tinyapp"))
    assert components(after)["tinydep"] == "1.0.2"
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", before["serialNumber"])
    uuid.UUID(before["serialNumber"].removeprefix("urn:uuid:"))
    assert before["serialNumber"] != after["serialNumber"]


def test_source_date_epoch_sets_the_timestamp_and_nothing_else_has_one(
    wheels: Path, two_runs: tuple[bytes, bytes], tmp_path: Path
) -> None:
    plain = json.loads(two_runs[0])
    dated = json.loads(
        sbom_of(wheels, tmp_path / "b.json", "--package", "tinyapp",
                env={"SOURCE_DATE_EPOCH": "1700000000"})
    )  # fmt: skip
    assert "timestamp" not in plain["metadata"]
    assert dated["metadata"]["timestamp"].startswith("2023-11-14T22:13:20")


def test_an_existing_environment_is_read_as_it_is(tmp_path: Path) -> None:
    output = tmp_path / "sbom.json"
    done = run_sbom("--environment", sys.executable, "--output", str(output))
    assert done.returncode == 0, done.stderr
    assert "pytest" in components(json.loads(output.read_text()))


def test_a_missing_wheel_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run_sbom("--wheels", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o.json"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "nowhere" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_package_the_wheels_do_not_hold_fails_with_exit_1(wheels: Path, tmp_path: Path) -> None:
    output = tmp_path / "o.json"
    done = run_sbom("--wheels", str(wheels), "--output", str(output), "--package", "absent")
    assert done.returncode == 1
    assert "absent" in done.stderr
    assert "Traceback" not in done.stderr
    assert not output.exists()
