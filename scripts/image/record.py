#!/usr/bin/env python3
"""Record what `scripts/image/build.sh` built in build/image/image.json, and check its size.

Reads the image from buildah's storage (`buildah inspect`): its id, its layers (digest,
uncompressed size and the Containerfile step that made each), and their total, the
uncompressed size of the runtime image. With ``--repro TAG`` it compares every layer with
the second build TAG and records which came out byte-identical. Prints the size and build
time; exits 1 with one line when the image is over ``--max-mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# The step whose layer holds gpufleet and its dependencies (the venv).
VENV_STEP = "/opt/gpufleet"


def inspect(name: str) -> dict[str, Any]:
    """`buildah inspect` of the image NAME."""
    driver = os.environ.get("STORAGE_DRIVER", "vfs")
    done = subprocess.run(
        ["buildah", "--storage-driver", driver, "inspect", "--type", "image", name],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def layers(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Each layer's digest, uncompressed size and the step that made it, base first."""
    manifest = json.loads(info["Manifest"])
    steps = [h.get("created_by", "") for h in info["OCIv1"]["history"] if not h.get("empty_layer")]
    if len(steps) != len(manifest["layers"]):
        steps = [""] * len(manifest["layers"])
    return [
        {"digest": layer["digest"], "size": layer["size"], "created_by": step.strip()}
        for layer, step in zip(manifest["layers"], steps, strict=True)
    ]


def venv_layer(mine: list[dict[str, Any]]) -> str | None:
    """The digest of the layer the venv's COPY made: gpufleet and its dependencies."""
    for layer in reversed(mine):
        if VENV_STEP in layer["created_by"] and "COPY" in layer["created_by"]:
            return str(layer["digest"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--archive")
    parser.add_argument("--archive-digest")
    parser.add_argument("--pushed")
    parser.add_argument("--pushed-digest")
    parser.add_argument("--repro", help="the tag of a second build to compare layers with")
    parser.add_argument("--base-seconds", type=int, default=0)
    parser.add_argument("--build-seconds", type=int, default=0)
    parser.add_argument("--total-seconds", type=int, default=0)
    parser.add_argument("--max-mb", type=int, default=350)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    info = inspect(args.name)
    mine = layers(info)
    size = sum(layer["size"] for layer in mine)
    record: dict[str, Any] = {
        "name": args.name,
        "version": args.version,
        "revision": args.revision,
        "base": args.base,
        "image_id": "sha256:" + info["FromImageID"],
        "manifest_digest": info["FromImageDigest"],
        "archive": args.archive,
        "archive_digest": args.archive_digest,
        "pushed": args.pushed,
        "pushed_digest": args.pushed_digest,
        "layers": mine,
        "gpufleet_layer": venv_layer(mine),
        "size": size,
        "max_size": args.max_mb * 1000 * 1000,
        "seconds": {
            "base": args.base_seconds,
            "build": args.build_seconds,
            "total": args.total_seconds,
        },
        "reproducibility": {"checked": False},
    }
    if args.repro:
        again = layers(inspect(args.repro))
        record["reproducibility"] = {
            "checked": True,
            "second_build": {"gpufleet_layer": venv_layer(again)},
            "layers": [
                {
                    "created_by": a["created_by"],
                    "first": a["digest"],
                    "second": b["digest"],
                    "same": a["digest"] == b["digest"],
                }
                for a, b in zip(mine, again, strict=False)
            ],
        }
    args.output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    print(f"image: {args.name} is {size / 1e6:.0f} MB uncompressed ({len(mine)} layers)")
    for layer in mine:
        print(f"  {layer['size'] / 1e6:7.1f} MB  {layer['created_by'][:90] or '(base)'}")
    if args.repro:
        for entry in record["reproducibility"]["layers"]:
            same = "same" if entry["same"] else "DIFFERENT"
            print(f"  second build: {same:9}  {entry['created_by'][:80] or '(base)'}")
    if size > record["max_size"]:
        print(
            f"image: {args.name} is {size / 1e6:.0f} MB uncompressed, over the limit of "
            f"{args.max_mb} MB (MAX_IMAGE_MB)",
            file=sys.stderr,
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
