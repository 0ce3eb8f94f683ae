"""Write the CycloneDX SBOM of the Python environment that goes into the image.

    scripts/image/sbom.py [--wheels DIR] [--package SPEC] [--output FILE]
    scripts/image/sbom.py --environment PYTHON [--output FILE]

With ``--wheels`` (default ``build/image/context/wheels``, what ``pip wheel``
left for the image build) a throwaway venv gets exactly what the image installs,
``pip install --no-index --find-links DIR SPEC`` (SPEC: ``gpufleet[all]``), and
``cyclonedx-py environment`` (PyPI ``cyclonedx-bom``) describes that venv; with
``--environment`` it describes an existing interpreter's environment instead.
The venv is made without pip (the runner's pip installs into it), so the SBOM
lists the packages the spec pulls in and nothing else.

The output is reproducible, so the image layer holding it is too: no random
serial number and no timestamp (``SOURCE_DATE_EPOCH``, when set, is the
timestamp), keys sorted, the refs cyclonedx-py makes up at random for local
sources derived from their components, and the serial number a UUID derived
from the SHA-256 of everything else. Exit 2 for a bad argument, 1 when pip or cyclonedx-py fail;
one line on stderr either way. See docs/image.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WHEELS = ROOT / "build" / "image" / "context" / "wheels"
DEFAULT_OUTPUT = ROOT / "build" / "image" / "context" / "sbom.cdx.json"
DEFAULT_PACKAGE = "gpufleet[all]"
SPEC_VERSION = "1.6"
"""CycloneDX spec written; the issue asks for 1.5 or newer."""


class SbomError(Exception):
    """A step failed; ``code`` is the exit status (2: bad input, 1: a tool failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _isolated_env() -> dict[str, str]:
    """The environment without PYTHONPATH/PYTHONHOME: what the caller's Python sees is not
    what the image installs, and cyclonedx-py reads the environment through its interpreter."""
    return {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}


def install(wheels: Path, package: str, venv: Path) -> Path:
    """A venv at ``venv`` with ``package`` installed from ``wheels`` only; its python."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
        capture_output=True, env=_isolated_env(),
    )  # fmt: skip
    python = venv / "bin" / "python"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--disable-pip-version-check", "--no-index", "--find-links", str(wheels), package],
        capture_output=True, text=True, check=False, env=_isolated_env(),
    )  # fmt: skip
    if done.returncode != 0:
        raise SbomError(
            f"installing {package!r} from {wheels} failed: {_last_line(done.stderr + done.stdout)}"
        )
    return python


def describe(python: Path) -> dict[str, Any]:
    """``cyclonedx-py environment`` of ``python``'s environment, reproducible, as JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "cyclonedx_py", "environment", "--spec-version", SPEC_VERSION,
         "--output-format", "JSON", "--output-reproducible", "--output-file", "-", str(python)],
        capture_output=True, text=True, check=False, env=_isolated_env(),
    )  # fmt: skip
    if done.returncode != 0:
        raise SbomError(f"cyclonedx-py environment {python} failed: {_last_line(done.stderr)}")
    document: dict[str, Any] = json.loads(done.stdout)
    return document


_RANDOM_REF = re.compile(r"BomRef\.[0-9.]+")


def _stable_refs(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with cyclonedx-py's random refs replaced by refs derived from the content.

    A component without a purl (installed from a local directory) gets a ref
    like ``BomRef.7105089611657427.894402278434``, new on every run; the
    replacement is ``NAME==VERSION#<hash of the component>``.
    """
    text = json.dumps(document, sort_keys=True)
    replacements: dict[str, str] = {}
    for component in document.get("components", []):
        ref = component.get("bom-ref", "")
        if _RANDOM_REF.fullmatch(ref):
            rest = {key: value for key, value in component.items() if key != "bom-ref"}
            digest = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()
            name = f"{component.get('name', '')}=={component.get('version', '')}"
            replacements[ref] = f"{name}#{digest[:16]}"
    for old, new in replacements.items():
        # A random ref is unique in the document, so plain replacement hits only its uses.
        text = text.replace(json.dumps(old), json.dumps(new))
    stable: dict[str, Any] = json.loads(text)
    return stable


def canonical(document: dict[str, Any]) -> bytes:
    """``document`` with stable refs and a content-derived serial number, as the bytes written."""
    body = {k: v for k, v in _stable_refs(document).items() if k != "serialNumber"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    body["serialNumber"] = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'sha256:' + digest)}"
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` at once: never a half-written SBOM in the context."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--wheels",
        type=Path,
        default=DEFAULT_WHEELS,
        help="directory of wheels to install from [build/image/context/wheels]",
    )
    source.add_argument(
        "--environment",
        type=Path,
        metavar="PYTHON",
        help="describe this interpreter's environment instead",
    )
    parser.add_argument(
        "--package",
        default=DEFAULT_PACKAGE,
        help=f"what to install from the wheels [{DEFAULT_PACKAGE}]",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the SBOM [build/image/context/sbom.cdx.json]",
    )
    args = parser.parse_args(argv)
    try:
        if args.environment is not None:
            if not args.environment.is_file():
                raise SbomError(f"--environment {args.environment}: no such interpreter", 2)
            document = describe(args.environment)
        else:
            if not args.wheels.is_dir():
                raise SbomError(f"--wheels {args.wheels}: no such directory", 2)
            with tempfile.TemporaryDirectory(prefix="gpufleet-sbom-") as scratch:
                python = install(args.wheels.resolve(), args.package, Path(scratch) / "venv")
                document = describe(python)
        write(args.output, canonical(document))
    except SbomError as exc:
        print(f"sbom.py: {exc}", file=sys.stderr)
        return exc.code
    except (OSError, subprocess.CalledProcessError, ValueError) as exc:
        print(f"sbom.py: {exc}", file=sys.stderr)
        return 1
    count = len(document.get("components", []))
    print(f"sbom.py: {count} components in {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
