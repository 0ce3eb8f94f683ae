"""``gpufleet exporter``: Prometheus metrics per GPU and per GPU process (a DaemonSet)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from gpufleet.core.config import load_settings
from gpufleet.exporter.errors import ExporterError
from gpufleet.gpu.cli import FleetOpt, NvmlOpt, SeedOpt, SimulateOpt, SmiXmlOpt
from gpufleet.gpu.select import SourceChoice


def _source_choice(
    *,
    simulate: str | None,
    fleet: Path | None,
    nvml: bool,
    smi_xml: Path | None,
    seed: int | None,
    env_simulate: str | None,
) -> SourceChoice:
    """The GPUs to read: the source flag, else ``GPU_EXPORTER_SIMULATE``, else NVML.

    A source flag overrides the variable, as every flag does, so ``--nvml`` or
    ``--fleet FILE`` on a pod whose environment simulates reads what it says.
    """
    if simulate is not None or fleet is not None or nvml or smi_xml is not None:
        choice = SourceChoice(simulate, fleet, nvml, smi_xml, seed)
    elif env_simulate is not None:
        choice = SourceChoice(simulate=env_simulate, seed=seed)
    else:
        choice = SourceChoice(nvml=True, seed=seed)
    choice.validate()
    return choice


def exporter(
    simulate: SimulateOpt = None,
    fleet: FleetOpt = None,
    nvml: NvmlOpt = False,
    smi_xml: SmiXmlOpt = None,
    seed: SeedOpt = None,
    bind_address: Annotated[
        str | None,
        typer.Option(
            "--bind-address", help="Address to serve on [env GPU_EXPORTER_BIND_ADDRESS; 0.0.0.0]."
        ),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Port to serve on [env GPU_EXPORTER_PORT; 9400].")
    ] = None,
    interval: Annotated[
        str | None,
        typer.Option(
            "--interval",
            help="Time between collections, at least 0.25s [env GPU_EXPORTER_INTERVAL; 5s].",
        ),
    ] = None,
    tls_cert_file: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert-file",
            help="Serve HTTPS with this certificate (PEM) [env GPU_EXPORTER_TLS_CERT_FILE].",
        ),
    ] = None,
    tls_key_file: Annotated[
        Path | None,
        typer.Option(
            "--tls-key-file",
            help="The certificate's private key (PEM) [env GPU_EXPORTER_TLS_KEY_FILE].",
        ),
    ] = None,
    tls_client_ca_file: Annotated[
        Path | None,
        typer.Option(
            "--tls-client-ca-file",
            help="Require client certificates signed by this "
            "CA (mutual TLS) [env GPU_EXPORTER_TLS_CLIENT_CA_FILE].",
        ),
    ] = None,
    host_proc: Annotated[
        Path | None,
        typer.Option(
            "--host-proc",
            help="The host's /proc [env GPU_EXPORTER_HOST_PROC; "
            "/host/proc if present, else /proc].",
        ),
    ] = None,
    enable_k8s: Annotated[
        bool, typer.Option("--enable-k8s", help="Attribute processes to pods via the API.")
    ] = False,
    disable_k8s: Annotated[
        bool, typer.Option("--disable-k8s", help="Never use the Kubernetes API.")
    ] = False,
    node: Annotated[
        str | None, typer.Option("--node", help="This node's name [env NODE_NAME; hostname].")
    ] = None,
    process_labels: Annotated[
        str | None,
        typer.Option(
            "--process-labels",
            help="Comma-separated process labels: pid, username, "
            "pod_name, pod_namespace, container_name; without pid, series are summed "
            "per container [env GPU_EXPORTER_PROCESS_LABELS; all].",
        ),
    ] = None,
    process_info: Annotated[
        bool | None,
        typer.Option(
            "--process-info/--no-process-info",
            help="Emit process_info{command} [env GPU_EXPORTER_PROCESS_INFO; off].",
        ),
    ] = None,
    pod_label_allowlist: Annotated[
        str | None,
        typer.Option(
            "--pod-label-allowlist",
            metavar="REGEX",
            help="Copy pod labels whose "
            "key matches onto process series as label_<key> "
            "[env GPU_EXPORTER_POD_LABEL_ALLOWLIST].",
        ),
    ] = None,
    max_series: Annotated[
        int | None,
        typer.Option(
            "--max-series",
            help="Hard cap on series per scrape; process series "
            "beyond it are left out and logged [env GPU_EXPORTER_MAX_SERIES; 50000].",
        ),
    ] = None,
    podresources_socket: Annotated[
        Path | None,
        typer.Option(
            "--podresources-socket",
            help="The kubelet PodResources socket [env "
            "GPU_EXPORTER_PODRESOURCES_SOCKET; "
            "/var/lib/kubelet/pod-resources/kubelet.sock].",
        ),
    ] = None,
    podresources_max_age: Annotated[
        str | None,
        typer.Option(
            "--podresources-max-age",
            help="While the kubelet cannot be read, keep its last GPU "
            "owners this long, then drop them [env GPU_EXPORTER_PODRESOURCES_MAX_AGE; 2m].",
        ),
    ] = None,
) -> None:
    """Serve Prometheus metrics per GPU and per GPU process, labelled with their pods."""
    from gpufleet.exporter.service import run_exporter
    from gpufleet.exporter.settings import ExporterSettings, K8sMode

    if enable_k8s and disable_k8s:
        raise ExporterError("--enable-k8s and --disable-k8s contradict each other")
    k8s = K8sMode.ON if enable_k8s else K8sMode.OFF if disable_k8s else None
    settings = load_settings(
        ExporterSettings, bind_address=bind_address, port=port,
        interval=interval, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file,
        tls_client_ca_file=tls_client_ca_file, host_proc=host_proc, k8s=k8s, node_name=node,
        process_labels=process_labels, process_info=process_info,
        pod_label_allowlist=pod_label_allowlist, max_series=max_series,
        podresources_socket=podresources_socket, podresources_max_age=podresources_max_age,
    )  # fmt: skip
    choice = _source_choice(
        simulate=simulate, fleet=fleet, nvml=nvml, smi_xml=smi_xml, seed=seed,
        env_simulate=settings.simulate,
    )  # fmt: skip
    asyncio.run(run_exporter(settings, choice=choice))
