"""Images in the layout MCV builds (GKM's packer), made here from a cache directory.

What MCV writes (see the GKM notes, section "What MCV writes"): one gzip layer
under a Docker schema2 or an OCI manifest; members ``io.triton.cache/…`` and
``io.triton.manifest/manifest.json`` (``io.vllm.*`` for vLLM) without ``./``,
uid/gid 0, modes 0755/0644, mtimes of the build; ``__grp__`` files as the
cache holds them (absolute child paths of the build machine); a manifest that
lists kernels, not files; the config labels ``cache.triton.image/{summary,
entry-count,cache-size-bytes}`` with the arch as a string, and
``WorkingDir: "/"``. Nothing here reuses `kcache.image`: the point is an
image our builder did not make.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.kcache.oci import RegistryClient
from gpufleet.kcache.reference import Reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Member = tuple[tarfile.TarInfo, bytes | None]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class McvImage:
    """An image as MCV would push it: manifest, config and layer blobs in memory."""

    manifest: bytes
    media_type: str
    config: bytes
    layers: list[bytes]
    labels: dict[str, str]
    kernels: list[dict[str, object]] = field(default_factory=list)

    def push(self, client: RegistryClient, reference: Reference) -> str:
        """Push the blobs and the manifest; the manifest digest."""
        for blob in (*self.layers, self.config):
            client.push_blob(reference.repository, blob)
        tag = reference.tag or sha256(self.manifest)
        return client.push_manifest(reference.repository, tag, self.manifest, self.media_type)


def member(name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE) -> Member:
    """A tar member as buildah writes one: root-owned, 0755/0644, stamped with the build time."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if data is None and kind == tarfile.REGTYPE else kind
    info.size = len(data) if data is not None else 0
    info.mode = 0o755 if info.type == tarfile.DIRTYPE else 0o644
    info.mtime = int(time.time())
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info, data


def triton_kernels(cache: Path) -> list[dict[str, object]]:
    """MCV's kernel list of a Triton cache: one entry per kernel metadata JSON, arch as a string."""
    kernels: list[dict[str, object]] = []
    for meta in sorted(cache.glob("*/*.json")):
        if meta.name.startswith("__grp__") or ".autotune." in meta.name:
            continue
        data = json.loads(meta.read_bytes())
        target = data["target"]
        kernels.append(
            {
                "hash": data["hash"],
                "backend": target["backend"],
                "arch": str(target["arch"]),
                "warp_size": target["warp_size"],
                "num_stages": data.get("num_stages", 0),
                "num_warps": data.get("num_warps", 0),
                "dummy_key": hashlib.sha256(data["hash"].encode()).hexdigest(),
            }
        )
    return kernels


def cache_members(cache: Path, top: str) -> tuple[list[Member], int]:
    """Every directory and file of `cache` under `top`/, as MCV packs them; their total bytes."""
    members = [member(f"{top}/")]
    total = 0
    for path in sorted(cache.rglob("*")):
        name = f"{top}/{path.relative_to(cache).as_posix()}"
        if path.is_dir():
            members.append(member(f"{name}/"))
        else:
            data = path.read_bytes()
            total += len(data)
            members.append(member(name, data))
    return members, total


def tar_gzip(members: list[Member]) -> tuple[bytes, str]:
    """The gzip layer of `members` and its diff_id (the sha256 of the tar)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    plain = out.getvalue()
    return gzip.compress(plain, mtime=int(time.time())), sha256(plain)


def mcv_image(
    cache: Path,
    *,
    docker: bool,
    size_bytes: int | None = None,
    extra: list[Member] | None = None,
    layers: int = 1,
) -> McvImage:
    """The MCV image of the Triton cache `cache`: Docker schema2 or OCI.

    `size_bytes` overrides the cache-size-bytes label (a wrong one), `extra`
    adds members to the layer after the cache's, `layers` > 1 pushes the same
    layer that many times (older MCU builds had two).
    """
    kernels = triton_kernels(cache)
    members, total = cache_members(cache, "io.triton.cache")
    manifest_json = json.dumps({"triton": kernels}, indent=2).encode()
    members += [
        member("io.triton.manifest/"),
        member("io.triton.manifest/manifest.json", manifest_json),
    ]
    members += extra or []
    layer, diff_id = tar_gzip(members)
    targets = sorted(
        {(str(k["backend"]), str(k["arch"]), int(str(k["warp_size"]))) for k in kernels}
    )
    labels = {
        "cache.triton.image/summary": json.dumps(
            {"targets": [{"backend": b, "arch": a, "warp_size": w} for b, a, w in targets]}
        ),
        "cache.triton.image/entry-count": str(len(kernels)),
        "cache.triton.image/cache-size-bytes": str(total if size_bytes is None else size_bytes),
    }
    return assemble(layer, diff_id, labels, docker=docker, layers=layers, kernels=kernels)


def assemble(
    layer: bytes,
    diff_id: str,
    labels: dict[str, str],
    *,
    docker: bool,
    layers: int = 1,
    kernels: list[dict[str, object]] | None = None,
) -> McvImage:
    """Config and manifest around `layer`, the way docker build or buildah push them."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": {"Labels": labels, "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id] * layers},
            "history": [{"created_by": "COPY io.triton.cache/ ./io.triton.cache/"}],
        }
    ).encode()
    layer_type, config_type, manifest_type = (
        (DOCKER_LAYER, DOCKER_CONFIG, DOCKER_MANIFEST)
        if docker
        else (OCI_LAYER, OCI_CONFIG, OCI_MANIFEST)
    )
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "size": len(config), "digest": sha256(config)},
        "layers": [{"mediaType": layer_type, "size": len(layer), "digest": sha256(layer)}] * layers,
    }
    if not docker:
        doc["annotations"] = {
            "org.opencontainers.image.base.digest": "",
            "org.opencontainers.image.base.name": "",
        }
    return McvImage(
        manifest=json.dumps(doc, indent=3).encode(),
        media_type=manifest_type,
        config=config,
        layers=[layer] * layers,
        labels=labels,
        kernels=kernels or [],
    )
