"""``scripts/image/sbom.py``'s canonical form: the same SBOM bytes for the same content."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "image" / "sbom.py"


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("image_sbom", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_bom_refs_of_local_sources_are_replaced_by_ones_from_the_content() -> None:
    # cyclonedx-py gives a component without a purl (a local directory install) a random ref.
    def document(ref: str) -> dict[str, Any]:
        return {
            "bomFormat": "CycloneDX",
            "components": [
                {"bom-ref": "a==1", "name": "a", "version": "1"},
                {"bom-ref": ref, "name": "local", "version": "0.1"},
            ],
            "dependencies": [{"ref": "a==1", "dependsOn": [ref]}, {"ref": ref}],
        }

    canonical = _load_script().canonical
    first = canonical(document("BomRef.7105089611657427.8944022784345834"))
    second = canonical(document("BomRef.40981008680544406.515677188572816"))
    assert first == second
    parsed = json.loads(first)
    ref = parsed["components"][1]["bom-ref"]
    assert ref.startswith("local==0.1")
    assert parsed["dependencies"] == [{"ref": "a==1", "dependsOn": [ref]}, {"ref": ref}]
