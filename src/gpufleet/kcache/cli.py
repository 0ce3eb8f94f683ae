"""``gpufleet cache``: build, inspect, check, extract, sign and verify kernel cache images."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import Field
from rich.table import Table

from gpufleet.core.config import CommonSettings, load_settings
from gpufleet.core.console import stdout_console
from gpufleet.core.errors import GpufleetError
from gpufleet.gpu.cli import NvmlOpt, SimulateOpt
from gpufleet.kcache.model import CacheSummary

if TYPE_CHECKING:
    # Typing only: the registry client (httpx) is imported by the commands that use it.
    from gpufleet.kcache.oci import RegistryClient
    from gpufleet.kcache.reference import Reference

app = typer.Typer(
    help="Kernel cache images: JIT kernel caches (Triton, vLLM, Inductor) as OCI images."
)


def _default_store() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gpufleet" / "kcache"


class CacheSettings(CommonSettings):
    """Registry credentials and store defaults, from the environment."""

    registry_username: str | None = None
    registry_password: str | None = None
    kcache_store: Path = Field(default_factory=_default_store)
    kcache_mount_root: str | None = None
    kcache_max_config_bytes: int = Field(default=4 * 1024**2, ge=1)
    cosign_password: str | None = None
    kcache_deadline: float = Field(default=30 * 60.0, gt=0)


PlainHttpOpt = Annotated[
    bool,
    typer.Option(
        "--plain-http",
        help="Talk HTTP, not HTTPS. Automatic for loopback registries; elsewhere it needs "
        "--force-plain-http too.",
    ),
]
ForcePlainOpt = Annotated[
    bool, typer.Option("--force-plain-http", help="Allow --plain-http to a non-loopback registry.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
SignedRepositoryOpt = Annotated[
    str | None,
    typer.Option(
        "--signed-repository",
        metavar="REGISTRY/REPO",
        help="The repository the signature must name [the image's own]; for an image "
        "mirrored from there with its signature.",
    ),
]


class SignatureFormat(StrEnum):
    """The two cosign signature formats (``kcache.policy``'s names)."""

    COSIGN_V2 = "cosign-v2"
    COSIGN_V3 = "cosign-v3"


DeadlineOpt = Annotated[
    float | None,
    typer.Option(
        "--deadline",
        metavar="SECONDS",
        help="Give up on the registry after this long in all, however slowly it answers "
        "[env KCACHE_DEADLINE; 1800].",
    ),
]


_REFERENCE_SHAPE = "REGISTRY/REPOSITORY[:TAG][@sha256:HEX]"


def _reference(text: str, *, takes: str, dirs: bool = False) -> Reference:
    """Parse the image reference `text`, with a message of its own for a local path instead.

    `takes` names what the command wants (``cache extract REF``); `dirs` says
    whether it would take a cache directory too (then `text` is not one).
    A reference never starts with ``/`` or ``.``, so such text, or text that
    names something on disk, is taken for a path the user meant.
    """
    from gpufleet.kcache.errors import InvalidReferenceError
    from gpufleet.kcache.reference import Reference

    path = Path(text)
    try:
        exists = path.exists()
        is_dir = path.is_dir()
    except (OSError, ValueError):  # a name the OS refuses (NUL, too long) is no path of ours
        exists = is_dir = False
    looks_local = text.startswith(("/", "./", "../", "~")) or text in (".", "..")
    if looks_local or exists:
        wanted = "an image reference"
        if dirs:
            wanted = "a cache directory or " + wanted
        if is_dir:
            what = f"{text!r} is a directory, not an image reference"
        elif exists:
            what = f"{text!r} is a file, not {wanted}"
        else:
            missing = "directory" if dirs else "file or directory"
            what = f"{text!r}: no such {missing}, and not an image reference"
        raise InvalidReferenceError(f"{what}; {takes} takes {wanted} ({_REFERENCE_SHAPE})")
    return Reference.parse(text)


@contextlib.contextmanager
def _client(
    reference: str,
    plain_http: bool,
    force: bool,
    *,
    takes: str,
    dirs: bool = False,
    deadline: float | None = None,
) -> Iterator[tuple[RegistryClient, Reference]]:
    from gpufleet.kcache.auth import check_plain_http
    from gpufleet.kcache.oci import RegistryClient

    ref = _reference(reference, takes=takes, dirs=dirs)
    if plain_http:
        check_plain_http(ref.registry, force)
    settings = load_settings(CacheSettings, kcache_deadline=deadline)
    client = RegistryClient(
        ref.registry,
        plain_http=True if plain_http else None,
        username=settings.registry_username,
        password=settings.registry_password,
        deadline=settings.kcache_deadline,
    )
    try:
        yield client, ref
    finally:
        client.close()


def _is_dir(target: str) -> bool:
    return Path(target).is_dir()


@app.command()
def build(
    directory: Annotated[Path, typer.Argument(help="The cache directory.")],
    tag: Annotated[str, typer.Option("-t", "--tag", help="Where to push: REGISTRY/REPO:TAG.")],
    mount_root: Annotated[
        str | None,
        typer.Option(
            "--mount-root",
            help="The path pods will see the cache at "
            "[env KCACHE_MOUNT_ROOT; /var/cache/gpufleet/kernels].",
        ),
    ] = None,
    allow_unknown: Annotated[
        bool, typer.Option("--allow-unknown", help="Pack files the format does not know.")
    ] = False,
    mount_from: Annotated[
        str | None,
        typer.Option(
            "--mount-from",
            metavar="REPO",
            help="Another repository of the same registry that may hold the blobs already: "
            "they are mounted from it instead of uploaded.",
        ),
    ] = None,
    plain_http: PlainHttpOpt = False,
    force_plain_http: ForcePlainOpt = False,
    deadline: DeadlineOpt = None,
) -> None:
    """Pack a cache directory into a reproducible OCI image and push it; prints REF@DIGEST.

    On a terminal, stderr shows the layer's upload as a progress bar.
    """
    from gpufleet.kcache.image import DEFAULT_MOUNT_ROOT, build_image
    from gpufleet.kcache.progress import transfer_progress
    from gpufleet.kcache.transfer import push_image

    settings = load_settings(CacheSettings, kcache_mount_root=mount_root)
    with tempfile.TemporaryDirectory(prefix="gpufleet-build-") as workdir:
        image = build_image(
            directory, Path(workdir),
            mount_root=settings.kcache_mount_root or DEFAULT_MOUNT_ROOT,
            allow_unknown=allow_unknown,
        )  # fmt: skip
        with (
            _client(
                tag, plain_http, force_plain_http, takes="cache build --tag", deadline=deadline
            ) as (client, ref),
            transfer_progress(f"push {ref}", image.layer_size) as progress,
        ):
            digest = push_image(client, ref, image, mount_from=mount_from, progress=progress)
    sys.stdout.write(f"{ref}@{digest}\n")


def _summary_of(
    target: str, plain_http: bool, force: bool, *, command: str
) -> tuple[CacheSummary, dict[str, str]]:
    """The summary (and labels) of a directory or a remote image, for ``cache <command>``."""
    if _is_dir(target):
        from gpufleet.kcache.format import summarize

        return summarize(Path(target)), {}
    from gpufleet.kcache.transfer import fetch_image

    limit = load_settings(CacheSettings).kcache_max_config_bytes
    with _client(target, plain_http, force, takes=f"cache {command}", dirs=True) as (client, ref):
        remote = fetch_image(client, ref, max_config_bytes=limit)
    return remote.summary, remote.labels


@app.command()
def inspect(
    target: Annotated[
        str, typer.Argument(metavar="REF|DIR", help="An image or a cache directory.")
    ],
    as_json: JsonOpt = False,
    plain_http: PlainHttpOpt = False,
    force_plain_http: ForcePlainOpt = False,
) -> None:
    """Print what a cache holds: kind, targets, Triton versions, kernels, entries, size."""
    from gpufleet.kcache.compat import target_text
    from gpufleet.kcache.labels import summary_json

    summary, labels = _summary_of(target, plain_http, force_plain_http, command="inspect")
    if as_json:
        body = {**summary_json(summary), "labels": labels}
        sys.stdout.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
        return
    table = Table(title=target, show_header=False)
    table.add_row("kind", summary.kind.value)
    table.add_row("targets", ", ".join(target_text(t) for t in summary.targets))
    table.add_row("triton", ", ".join(summary.triton_versions) or "-")
    table.add_row("entries", str(summary.entry_count))
    table.add_row("size", f"{summary.size_bytes} bytes")
    table.add_row("kernels", ", ".join(summary.kernel_names))
    for key in sorted(labels):
        table.add_row(key, labels[key])
    stdout_console().print(table)


@app.command()
def check(
    target: Annotated[
        str, typer.Argument(metavar="REF|DIR", help="An image or a cache directory.")
    ],
    nvml: NvmlOpt = False,
    simulate: SimulateOpt = None,
    as_json: JsonOpt = False,
    plain_http: PlainHttpOpt = False,
    force_plain_http: ForcePlainOpt = False,
) -> None:
    """Which local GPUs can use the cache, and why. Exit 0: at least one; 1: none; 2: error."""
    from gpufleet.gpu.select import SourceChoice, open_source
    from gpufleet.kcache.compat import check as check_gpus
    from gpufleet.kcache.compat import target_text

    try:
        summary, _ = _summary_of(target, plain_http, force_plain_http, command="check")
        source = open_source(SourceChoice(simulate=simulate, nvml=nvml or simulate is None))
        try:
            devices = source.devices().devices
        finally:
            source.close()
    except GpufleetError as exc:  # exit 2 is part of this command's contract
        sys.stderr.write(f"gpufleet cache check: {exc}\n")
        raise typer.Exit(2) from None
    verdicts = check_gpus(summary, devices)
    if as_json:
        rows = [
            {
                "index": v.index, "uuid": v.uuid, "name": v.name, "matches": v.matches,
                "target": None if v.target is None else target_text(v.target), "reason": v.reason,
            }
            for v in verdicts
        ]  # fmt: skip
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        table = Table(title=f"{target}: {', '.join(target_text(t) for t in summary.targets)}")
        for column in ("index", "GPU", "target", "match", "why"):
            table.add_column(column)
        for v in verdicts:
            table.add_row(
                str(v.index), v.name, "-" if v.target is None else target_text(v.target),
                "yes" if v.matches else "no", v.reason,
            )  # fmt: skip
        stdout_console().print(table)
    raise typer.Exit(0 if any(v.matches for v in verdicts) else 1)


@app.command()
def extract(
    reference: Annotated[str, typer.Argument(metavar="REF")],
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            help="The content-addressed store [env KCACHE_STORE; ~/.cache/gpufleet/kcache].",
        ),
    ] = None,
    mount_root: Annotated[
        str | None,
        typer.Option(
            "--mount-root",
            help="Where pods will see the cache; __grp__ child paths "
            "are rewritten to it [env KCACHE_MOUNT_ROOT; the image's label].",
        ),
    ] = None,
    verify_key: Annotated[
        Path | None,
        typer.Option(
            "--verify-key",
            metavar="PUB",
            help="Refuse the image unless signed by this cosign public key.",
        ),
    ] = None,
    signed_repository: SignedRepositoryOpt = None,
    max_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-bytes",
            help="Refuse caches larger than this [8 GiB]; with --max-entries it also bounds "
            "the layer's download (docs/limits.md).",
        ),
    ] = None,
    max_entries: Annotated[
        int | None,
        typer.Option(
            "--max-entries",
            help="Refuse layers with more entries [65536]; also bounds manifest.json "
            "(512 bytes an entry).",
        ),
    ] = None,
    plain_http: PlainHttpOpt = False,
    force_plain_http: ForcePlainOpt = False,
    deadline: DeadlineOpt = None,
) -> None:
    """Pull into the store for the mount root, atomically (again: nothing to do); prints the path.

    One directory per image and mount root: <store>/caches/sha256/<hex>/<sha256 of the root>/.
    """
    from gpufleet.kcache.extract import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES
    from gpufleet.kcache.keys import load_public_key
    from gpufleet.kcache.store import CacheStore
    from gpufleet.kcache.transfer import pull_to_store

    settings = load_settings(CacheSettings, kcache_store=store, kcache_mount_root=mount_root)
    key = None if verify_key is None else load_public_key(verify_key)
    with _client(
        reference, plain_http, force_plain_http, takes="cache extract", deadline=deadline
    ) as (client, ref):
        pulled = pull_to_store(
            client, ref, CacheStore(settings.kcache_store),
            mount_root=settings.kcache_mount_root,
            verify_key=key, max_bytes=max_bytes or DEFAULT_MAX_BYTES,
            max_entries=max_entries or DEFAULT_MAX_ENTRIES,
            max_config_bytes=settings.kcache_max_config_bytes,
            signed_repository=signed_repository,
        )  # fmt: skip
    sys.stdout.write(f"{pulled.path}\n")


@app.command()
def sign(
    reference: Annotated[str, typer.Argument(metavar="REF")],
    key: Annotated[
        Path, typer.Option("--key", help="EC P-256 private key (PEM; password in COSIGN_PASSWORD).")
    ],
    signature_format: Annotated[
        SignatureFormat,
        typer.Option(
            "--format",
            help="cosign-v2: the sha256-<digest>.sig tag; cosign-v3: a Sigstore bundle "
            "attached as an OCI 1.1 referrer (what cosign 3 writes).",
            case_sensitive=False,
        ),
    ] = SignatureFormat.COSIGN_V2,
    plain_http: PlainHttpOpt = False,
    force_plain_http: ForcePlainOpt = False,
) -> None:
    """Sign an image in cosign's key-based format; prints the signature manifest's digest."""
    from gpufleet.kcache.keys import load_private_key

    settings = load_settings(CacheSettings)
    password = None if settings.cosign_password is None else settings.cosign_password.encode()
    private = load_private_key(key, password)
    with _client(reference, plain_http, force_plain_http, takes="cache sign") as (client, ref):
        if signature_format is SignatureFormat.COSIGN_V3:
            from gpufleet.kcache.bundle import sign_image_bundle

            digest = sign_image_bundle(client, ref, private)
        else:
            from gpufleet.kcache.sign import sign_image

            digest = sign_image(client, ref, private)
    sys.stdout.write(f"{digest}\n")


@app.command()
def verify(
    reference: Annotated[str, typer.Argument(metavar="REF")],
    key: Annotated[Path, typer.Option("--key", help="The signer's public key (PEM).")],
    signature_format: Annotated[
        SignatureFormat | None,
        typer.Option(
            "--format",
            help="Check only this format [either: the cosign-v3 bundle, then the cosign-v2 tag].",
            case_sensitive=False,
        ),
    ] = None,
    signed_repository: SignedRepositoryOpt = None,
    plain_http: PlainHttpOpt = False,
    force_plain_http: ForcePlainOpt = False,
) -> None:
    """Verify an image's signature; prints the verified manifest digest.

    A cosign-v2 signature must name the image's own repository, or --signed-repository.
    """
    from gpufleet.kcache.keys import load_public_key
    from gpufleet.kcache.policy import verify_signed

    public = load_public_key(key)
    wanted = None if signature_format is None else signature_format.value
    with _client(reference, plain_http, force_plain_http, takes="cache verify") as (client, ref):
        verified = verify_signed(
            client, ref, {key.name: public}, signature_format=wanted,
            signed_repository=signed_repository,
        )  # fmt: skip
    sys.stdout.write(f"{verified.digest}\n")


@app.command()
def crds() -> None:
    """Print the gkm.io CustomResourceDefinitions (a YAML stream): ``| kubectl apply -f -``."""
    from gpufleet.kcache.crds import render_crds

    sys.stdout.write(render_crds())


@app.command()
def operator(
    server_port: Annotated[
        int | None,
        typer.Option(
            "--server-port",
            help="Port of /metrics, /healthz, /readyz [env SERVER_PORT; default 8080].",
        ),
    ] = None,
) -> None:
    """Run the cluster operator: resolve and verify GKMCache images, roll node status up."""
    import asyncio

    from gpufleet.kcache.operator.run import run_operator
    from gpufleet.kcache.operator.settings import OperatorSettings

    settings = load_settings(OperatorSettings, server_port=server_port)
    asyncio.run(run_operator(settings))


@app.command()
def node(
    csi_endpoint: Annotated[
        str | None,
        typer.Option(
            "--csi-endpoint",
            metavar="unix:///PATH",
            help="The CSI socket [env CSI_ENDPOINT; unix:///var/lib/kubelet/plugins/csi-gkm/csi.sock].",
        ),
    ] = None,
    kubelet_dir: Annotated[
        Path | None,
        typer.Option(
            "--kubelet-dir",
            help="The kubelet's directory; publish targets must lie under its pods/ "
            "[env KUBELET_DIR; /var/lib/kubelet].",
        ),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store", help="The node's cache store [env KCACHE_STORE; /var/lib/gpufleet/kcache]."
        ),
    ] = None,
    node_name: Annotated[
        str | None, typer.Option("--node-name", help="This node's name [env NODE_NAME; required].")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port", help="Port of /metrics, /healthz, /readyz [env METRICS_PORT; 8084]."
        ),
    ] = None,
    nvml: NvmlOpt = False,
    simulate: SimulateOpt = None,
) -> None:
    """Run the node process (a DaemonSet pod): pull caches, report them, serve them over CSI."""
    import asyncio

    from gpufleet.gpu.select import SourceChoice
    from gpufleet.kcache.node.run import run_node
    from gpufleet.kcache.node.settings import NodeSettings

    settings = load_settings(
        NodeSettings, csi_endpoint=csi_endpoint, kubelet_dir=kubelet_dir, kcache_store=store,
        node_name=node_name, metrics_port=metrics_port,
    )  # fmt: skip
    if nvml or simulate is not None:
        choice = SourceChoice(simulate=simulate, nvml=nvml)
    else:
        preset = settings.kcache_simulate
        choice = SourceChoice(simulate=preset, nvml=preset is None)
    choice.validate()
    asyncio.run(run_node(settings, choice=choice))
