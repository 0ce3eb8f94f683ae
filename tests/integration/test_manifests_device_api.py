"""The ``device-api`` overlay, rendered by the real ``kubectl kustomize``: would its pods start?

Two kinds of evidence. The rendered objects go to the Kubernetes API double through the
real ``kubernetes_asyncio`` client: the Namespace and ServiceAccount as they are, the
DaemonSet's pod template as the Pod its controller would create on a node (the double
serves no DaemonSets; the DaemonSet and the Service are instead read into the client's
own models, which drop any field the API does not have, and checked against the rules
the API server applies to a pod's ports, probes and volumes).

Then the two containers' commands, as the manifest writes them, run as subprocesses
against one shared socket directory, with only what the kubelet would substitute
substituted: the downward API's ``spec.nodeName``, each volume as a directory under
/tmp (one per volume, so the two containers share it only because they mount the same
volume), the uid, gid and supplementary groups of each container's securityContext,
and the image's ``gpufleet`` entry point as this interpreter's ``gpufleet.cli``. Two
substitutions are ours: the provider's ``--nvml`` becomes ``--simulate dgx-h100`` (no
GPU here), and each container's ``METRICS_PORT`` a free port of this shared host (a pod
would have a network namespace of its own; the test first checks that the probes name
exactly the port ``METRICS_PORT`` sets, and that the two containers' ports differ).
Each container runs under ``setpriv`` as its securityContext says: uid, gid, groups
(fsGroup), no capabilities, no_new_privs; that needs root, as the kubelet has (without
it those tests skip). Where the interpreter or the checkout is unreadable by other
users (under /root on the development machines), the non-root processes keep
CAP_DAC_READ_SEARCH to read them: it grants no write, and connecting to a unix socket
needs write permission, so the socket's mode and group are still what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes_asyncio.client import ApiClient, CoreV1Api

import tests.integration.manifests_support as common
from gpufleet.deviceapi.client import DeviceApiClient
from gpufleet.gpu import sim
from tests.doubles.kubeapi import KubeApiDouble
from tests.integration.manifests_support import Manifest
from tests.polling import wait_until

pytestmark = pytest.mark.integration

OVERLAY = common.DEVICE_API
OVERLAY_DIR = common.OVERLAYS_DIR / OVERLAY
NAMESPACE = "gpufleet-device-api"
APP = "gpufleet-device-api"
CONSUMER_GID = 65532
"""The group node-local consumers run as; the socket's group."""
HOST_SOCKET_DIR = "/var/run/gpufleet"
NODE = "gpu-node-1"
PRESET = "dgx-h100"
START_GUARD_S = 60.0
"""Hang guard: how long the two processes may take to become ready, not a timing."""
PORT_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")
"""An IANA_SVC_NAME, as the API server validates a container port's name."""


def render() -> tuple[Manifest, ...]:
    return common.render(OVERLAY)


def objects(*kinds: str) -> list[Manifest]:
    return common.objects(OVERLAY, *kinds)


def daemonset() -> Manifest:
    return common.the_daemonset(OVERLAY)


def pod_spec() -> Manifest:
    return common.pod_spec(daemonset())


def container(name: str) -> Manifest:
    (found,) = [c for c in pod_spec()["containers"] if c["name"] == name]
    return found


def env(name: str) -> dict[str, Manifest]:
    return common.env_of(container(name))


def probe_ports(name: str) -> dict[str, int]:
    """Each probe's port, by probe kind, resolved from a port name to its containerPort."""
    own = container(name)
    named = {port["name"]: port["containerPort"] for port in own["ports"]}
    out = {}
    for kind in ("livenessProbe", "readinessProbe"):
        port = own[kind]["httpGet"]["port"]
        out[kind] = named[port] if isinstance(port, str) else int(port)
    return out


# Rendering


def test_overlay_renders_its_namespace_account_daemonset_and_service() -> None:
    kinds = sorted((obj["kind"], obj["metadata"]["name"]) for obj in render())
    assert kinds == [
        ("DaemonSet", APP),
        ("Namespace", NAMESPACE),
        ("Service", APP),
        ("ServiceAccount", APP),
    ]


def test_every_overlay_file_is_listed_in_the_kustomization() -> None:
    import yaml

    kustomization = yaml.safe_load((OVERLAY_DIR / "kustomization.yaml").read_text())
    assert (set(kustomization), sorted(kustomization["resources"])) == (
        {"resources", "images"},
        sorted(p.name for p in OVERLAY_DIR.glob("*.yaml") if p.name != "kustomization.yaml"),
    )


def test_every_object_is_in_its_namespace_and_carries_its_labels() -> None:
    wrong = [
        f"{obj['kind']}/{obj['metadata']['name']}"
        for obj in render()
        if obj["metadata"].get("namespace", NAMESPACE) != NAMESPACE
        or obj["metadata"]["labels"].get("app.kubernetes.io/name") != APP
        or obj["metadata"]["labels"].get("app.kubernetes.io/part-of") != "gpufleet"
    ]
    assert wrong == []


def test_namespace_enforces_privileged_because_the_pod_mounts_a_host_path() -> None:
    # hostPath volumes are forbidden by "baseline" and "restricted": the pod would be refused.
    (namespace,) = objects("Namespace")
    host_paths = [v["hostPath"]["path"] for v in pod_spec()["volumes"] if "hostPath" in v]
    assert (namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], host_paths) == (
        "privileged",
        [HOST_SOCKET_DIR],
    )


# The API server's view


async def test_the_api_double_accepts_the_namespace_account_and_the_daemonsets_pod() -> None:
    (namespace,) = objects("Namespace")
    (account,) = objects("ServiceAccount")
    template = daemonset()["spec"]["template"]
    # The Pod the DaemonSet controller creates on a node: the template, a name, the node.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": f"{APP}-x7k2p", "namespace": NAMESPACE},
        "spec": {**template["spec"], "nodeName": NODE},
    }
    async with KubeApiDouble() as api, ApiClient(api.client_configuration()) as client:
        core = CoreV1Api(client)
        await core.create_namespace(namespace)
        await core.create_namespaced_service_account(NAMESPACE, account)
        await core.create_namespaced_pod(NAMESPACE, pod)
        (stored,) = api.objects("pods", NAMESPACE)
        (stored_account,) = api.objects("serviceaccounts", NAMESPACE)
    assert (stored["spec"], stored_account["automountServiceAccountToken"]) == (pod["spec"], False)


@pytest.mark.parametrize("kind", ["DaemonSet", "Service", "Namespace", "ServiceAccount"])
async def test_objects_have_only_fields_of_the_kubernetes_api(kind: str) -> None:
    # The client's models know every field of the API; a misspelt or misplaced one is lost
    # on the way in and out, so the round trip would differ from the manifest.
    (obj,) = objects(kind)
    async with ApiClient() as client:
        model = client.deserialize(types.SimpleNamespace(data=json.dumps(obj)), f"V1{kind}")
        assert client.sanitize_for_serialization(model) == obj


def test_container_port_names_are_valid_and_unique_in_the_pod() -> None:
    names = [port["name"] for c in pod_spec()["containers"] for port in c["ports"]]
    assert ([n for n in names if not PORT_NAME.match(n)], len(set(names))) == ([], len(names))


def test_every_mount_names_a_volume_of_the_pod() -> None:
    volumes = {volume["name"] for volume in pod_spec()["volumes"]}
    mounted = {m["name"] for c in pod_spec()["containers"] for m in c["volumeMounts"]}
    assert (mounted - volumes, volumes - mounted) == (set(), set())


@pytest.mark.parametrize("name", ["server", "provider"])
def test_probes_check_healthz_and_readyz_on_the_port_metrics_port_sets(name: str) -> None:
    own = container(name)
    paths = [own[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe")]
    port = int(env(name)["METRICS_PORT"]["value"])
    assert (paths, set(probe_ports(name).values())) == (["/healthz", "/readyz"], {port})


def test_the_two_containers_listen_on_different_ports() -> None:
    # One network namespace per pod: the same port twice would fail the second to start.
    assert env("server")["METRICS_PORT"]["value"] != env("provider")["METRICS_PORT"]["value"]


def test_service_targets_both_metrics_ports_of_the_pods() -> None:
    (service,) = objects("Service")
    labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    named = {p["name"]: p["containerPort"] for c in pod_spec()["containers"] for p in c["ports"]}
    targets = {p["targetPort"]: p["port"] for p in service["spec"]["ports"]}
    assert (service["spec"]["selector"].items() <= labels.items(), targets) == (True, named)


# The pod: what runs, as whom, with which access


def test_the_pod_runs_the_server_and_the_nvml_provider_from_the_one_image() -> None:
    commands = {c["name"]: (c["image"], c["command"], c["args"]) for c in pod_spec()["containers"]}
    assert commands == {
        "server": (common.IMAGE, ["gpufleet"], ["device-api", "serve"]),
        "provider": (common.IMAGE, ["gpufleet"], ["device-api", "provider", "--nvml"]),
    }


def test_both_containers_mount_the_host_socket_directory_at_the_socket_path() -> None:
    spec = pod_spec()
    (socket_volume,) = [v for v in spec["volumes"] if "hostPath" in v]
    mounts = {
        c["name"]: [
            (m["mountPath"], m.get("readOnly", False))
            for m in c["volumeMounts"]
            if m["name"] == socket_volume["name"]
        ]
        for c in spec["containers"]
    }
    sockets = {name: env(name)["DEVICE_API_SOCKET"]["value"] for name in mounts}
    assert (socket_volume["hostPath"], mounts, sockets) == (
        {"path": HOST_SOCKET_DIR, "type": "DirectoryOrCreate"},
        {"server": [(HOST_SOCKET_DIR, False)], "provider": [(HOST_SOCKET_DIR, False)]},
        {"server": f"{HOST_SOCKET_DIR}/device.sock", "provider": f"{HOST_SOCKET_DIR}/device.sock"},
    )


def test_only_the_provider_asks_the_nvidia_runtime_for_nvml_and_no_gpu_is_requested() -> None:
    asked = {
        name: {k: env(name)[k]["value"] for k in common.env_of(container(name)) if "NVIDIA" in k}
        for name in ("server", "provider")
    }
    requested = [
        resource
        for c in pod_spec()["containers"]
        for section in ("requests", "limits")
        for resource in c["resources"].get(section, {})
        if resource.startswith("nvidia.com/")
    ]
    assert (pod_spec()["runtimeClassName"], asked, requested) == (
        "nvidia",
        {
            "server": {},
            "provider": {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "utility"},
        },
        [],
    )


def test_the_provider_takes_its_node_name_from_the_downward_api() -> None:
    assert env("provider")["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_runs_on_gpu_nodes_only_and_tolerates_their_taint() -> None:
    spec = pod_spec()
    tolerated = {toleration["key"] for toleration in spec.get("tolerations", [])}
    assert (spec["nodeSelector"], "nvidia.com/gpu" in tolerated) == (
        {"nvidia.com/gpu.present": "true"},
        True,
    )


def test_the_server_is_an_unprivileged_root_with_the_consumers_group() -> None:
    # Root only to create the socket in the root-owned hostPath directory.
    assert (identity("server"), hardened("server")) == ((0, CONSUMER_GID), HARDENED)


def test_the_provider_is_not_root_and_has_the_consumers_group() -> None:
    non_root = common.effective_security(pod_spec(), container("provider"), "runAsNonRoot")
    assert (identity("provider"), hardened("provider"), non_root) == (
        (65532, CONSUMER_GID),
        HARDENED,
        True,
    )


def test_emptydirs_get_the_consumers_group_and_no_api_token_is_mounted() -> None:
    spec = pod_spec()
    assert (spec["securityContext"]["fsGroup"], spec["automountServiceAccountToken"]) == (
        CONSUMER_GID,
        False,
    )


def test_no_api_permissions_at_all() -> None:
    assert objects("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding") == []


def test_shares_no_host_namespace() -> None:
    spec = pod_spec()
    assert [f for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)] == []


def identity(name: str) -> tuple[int, int]:
    spec, own = pod_spec(), container(name)
    return (
        common.effective_security(spec, own, "runAsUser"),
        common.effective_security(spec, own, "runAsGroup"),
    )


HARDENED = {
    "privileged": False,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccomp": "RuntimeDefault",
}


def hardened(name: str) -> dict[str, object]:
    """The container's hardening, as the kubelet applies it (compare with HARDENED)."""
    spec, own = pod_spec(), container(name)
    security = own["securityContext"]
    return {
        "privileged": security.get("privileged", False),
        "allowPrivilegeEscalation": security.get("allowPrivilegeEscalation"),
        "readOnlyRootFilesystem": security.get("readOnlyRootFilesystem"),
        "capabilities": security.get("capabilities"),
        "seccomp": (common.effective_security(spec, own, "seccompProfile") or {}).get("type"),
    }


# The two containers, run as the manifest writes them


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Container:
    """One container's command line, environment and user, as the kubelet would run it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    groups: list[int]
    metrics_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Pod:
    """The pod on this host: a directory per volume, the containers to run."""

    root: Path
    volumes: dict[str, Path]
    containers: dict[str, Container]

    def mapped(self, name: str, path: str) -> Path:
        """A path as container ``name`` sees it, as it lies on this host."""
        for mount in container(name)["volumeMounts"]:
            root = mount["mountPath"].rstrip("/")
            if path == root or path.startswith(root + "/"):
                return self.volumes[mount["name"]] / path[len(root) :].lstrip("/")
        raise AssertionError(f"{name}: {path} is on no volume (a read-only root filesystem)")


def make_volumes(root: Path) -> dict[str, Path]:
    """Each volume as the kubelet makes it: hostPath DirectoryOrCreate root:root 0755;
    emptyDir 0777, with fsGroup its group and setgid."""
    fs_group = pod_spec()["securityContext"]["fsGroup"]
    made: dict[str, Path] = {}
    for index, volume in enumerate(pod_spec()["volumes"]):
        path = root / f"v{index}"
        path.mkdir()
        if "hostPath" in volume:
            os.chown(path, 0, 0)
            path.chmod(0o755)
        elif "emptyDir" in volume:
            os.chown(path, 0, fs_group)
            path.chmod(0o2777)
        else:
            raise AssertionError(f"volume {volume['name']}: no stand-in for {sorted(volume)}")
        made[volume["name"]] = path
    return made


def container_env(pod: Pod, name: str, metrics_port: int) -> dict[str, str]:
    """The container's env, with mount paths mapped and the downward API filled in."""
    out = {
        # The image's environment, as this checkout provides it.
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", str(common.ROOT / "src")),
        "TMPDIR": str(pod.mapped(name, "/tmp")),
        "HOME": str(pod.mapped(name, "/tmp")),
    }
    for variable, entry in env(name).items():
        if "value" in entry:
            value = entry["value"]
            out[variable] = str(pod.mapped(name, value)) if value.startswith("/") else value
        elif entry["valueFrom"].get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            out[variable] = NODE
        else:
            raise AssertionError(f"{name}: no stand-in for {variable}'s {entry['valueFrom']}")
    out["METRICS_PORT"] = str(metrics_port)
    return out


def container_argv(pod: Pod, name: str) -> list[str]:
    own = container(name)
    assert own["command"] == ["gpufleet"], own["command"]
    argv = [sys.executable, "-m", "gpufleet.cli"]
    for arg in own["args"]:
        if arg == "--nvml":
            argv += ["--simulate", PRESET]  # no GPU here: the simulator behind the NVML API
        elif arg.startswith("/"):
            argv.append(str(pod.mapped(name, arg)))
        else:
            argv.append(arg)
    return argv


def build_pod(root: Path) -> Pod:
    spec = pod_spec()
    pod = Pod(root, make_volumes(root), {})
    for own in spec["containers"]:
        name = own["name"]
        uid, gid = identity(name)
        port = free_port()
        pod.containers[name] = Container(
            name,
            container_argv(pod, name),
            container_env(pod, name, port),
            uid,
            gid,
            [
                spec["securityContext"]["fsGroup"],
                *spec["securityContext"].get("supplementalGroups", []),
            ],
            port,
            root / f"{name}.log",
        )
    return pod


def readable_by_anyone(path: Path) -> bool:
    """Whether a user other than the owner may reach ``path`` (search every directory above)."""
    resolved = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in resolved.parents) and bool(
        resolved.stat().st_mode & stat.S_IROTH
    )


@functools.cache
def read_search_needed() -> bool:
    """True where this interpreter or checkout lies where other users cannot read it.

    On the development machines the interpreter is under /root (mode 0700). A container's
    user reads its image; here a non-root process gets CAP_DAC_READ_SEARCH for that: it
    reads and searches, but writes nothing it could not, and connecting to a unix socket
    needs write permission, so the socket's mode and group are checked as in the pod.
    """
    paths = [Path(sys.executable), Path(sysconfig.get_paths()["stdlib"]) / "os.py"]
    paths += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths.append(Path(common.ROOT / "src" / "gpufleet" / "__init__.py"))
    return not all(readable_by_anyone(p) for p in paths if p.exists())


def as_user(uid: int, gid: int, groups: list[int]) -> list[str]:
    """``setpriv`` as the runtime applies a securityContext: uid, gid, groups, no
    capabilities (drop ALL), no_new_privs (allowPrivilegeEscalation: false)."""
    caps = "-all"
    if uid != 0 and read_search_needed():
        caps = "-all,+dac_read_search"
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    argv += [f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]
    argv += [f"--inh-caps={caps}", f"--bounding-set={caps}", "--no-new-privs"]
    if caps != "-all":
        argv.append("--ambient-caps=+dac_read_search")
    return [*argv, "--"]


def start(own: Container) -> None:
    with own.log.open("wb") as log:
        own.process = subprocess.Popen(
            [*as_user(own.uid, own.gid, own.groups), *own.argv],
            env=own.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def logs(pod: Pod) -> str:
    return "\n".join(f"--- {c.name}:\n{c.log.read_text()}" for c in pod.containers.values())


@contextlib.contextmanager
def running(pod: Pod) -> Iterator[Pod]:
    """Both containers started at once, as the kubelet starts them; SIGTERM'd afterwards."""
    try:
        for own in pod.containers.values():
            start(own)
        yield pod
    finally:
        for own in pod.containers.values():
            if own.process is not None and own.process.poll() is None:
                own.process.terminate()
        for own in pod.containers.values():
            if own.process is not None:
                try:
                    own.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    own.process.kill()
                    own.process.wait()


def wait_ready(pod: Pod) -> None:
    def ready() -> bool:
        exited = {c.name: c.process.poll() for c in pod.containers.values() if c.process}
        if any(code is not None for code in exited.values()):
            pytest.fail(f"a container exited: {exited}\n{logs(pod)}")
        return all(http_status(c.metrics_port, "/readyz") == 200 for c in pod.containers.values())

    try:
        wait_until(ready, START_GUARD_S, "both containers ready")
    except pytest.fail.Exception as hang:
        # The containers' logs say why; read them now, when it has failed.
        pytest.fail(f"{hang}\n{logs(pod)}")


def consumer_list(pod: Pod, socket_path: Path, gid: int) -> subprocess.CompletedProcess[str]:
    """``gpufleet gpus list --json`` as a node-local consumer pod with group ``gid``."""
    command = [sys.executable, "-m", "gpufleet.cli", "gpus", "list", "--json"]
    return subprocess.run(
        [*as_user(4242, gid, []), *command, "--socket", str(socket_path)],
        env={
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": pod.containers["server"].env["PYTHONPATH"],
            "HOME": str(pod.root),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def started_pod() -> Iterator[Pod]:
    """The pod, started and ready; stopped and removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("running the containers as their uid and gid needs root, as the kubelet has")
    # Short, under /tmp: a unix socket's path has at most 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="dapi-", dir="/tmp"))
    root.chmod(0o755)
    try:
        with running(build_pod(root)) as started:
            wait_ready(started)
            yield started
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    """One ready pod for the checks that leave it running."""
    with started_pod() as started:
        yield started


@pytest.fixture
def own_pod() -> Iterator[Pod]:
    """A ready pod of the test's own, for a test that stops it."""
    with started_pod() as started:
        yield started


async def list_gpus(socket_path: Path) -> list[tuple[str, str]]:
    async with DeviceApiClient(str(socket_path)) as client:
        listed = await client.list("")
    return sorted((gpu.spec.uuid, gpu.spec.node) for gpu in listed.items)


async def test_the_two_containers_share_the_socket_and_the_provider_registers_the_gpus(
    pod: Pod,
) -> None:
    server_socket = pod.mapped("server", env("server")["DEVICE_API_SOCKET"]["value"])
    provider_socket = pod.mapped("provider", env("provider")["DEVICE_API_SOCKET"]["value"])
    expected = sorted((gpu.uuid, NODE) for gpu in sim.preset(PRESET, 0).gpus)
    assert (provider_socket, await list_gpus(server_socket)) == (server_socket, expected)


async def test_the_socket_is_0660_with_the_consumers_group(pod: Pod) -> None:
    info = pod.mapped("server", env("server")["DEVICE_API_SOCKET"]["value"]).stat()
    assert (stat.S_ISSOCK(info.st_mode), stat.S_IMODE(info.st_mode), info.st_gid) == (
        True,
        0o660,
        CONSUMER_GID,
    )


async def test_a_consumer_with_the_group_lists_the_gpus_and_one_without_is_refused(
    pod: Pod,
) -> None:
    socket_path = pod.mapped("server", env("server")["DEVICE_API_SOCKET"]["value"])
    member = await asyncio.to_thread(consumer_list, pod, socket_path, CONSUMER_GID)
    stranger = await asyncio.to_thread(consumer_list, pod, socket_path, 4242)
    assert (member.returncode, len(json.loads(member.stdout or "{}").get("items", []))) == (
        0,
        len(sim.preset(PRESET, 0).gpus),
    ), member.stderr
    # Refused before it connects: the socket is not readable (nor writable) by others.
    assert (stranger.returncode, stranger.stdout, "is not readable" in stranger.stderr) == (
        2,
        "",
        True,
    ), stranger.stderr


@pytest.mark.parametrize("name", ["server", "provider"])
async def test_healthz_and_readyz_answer_200_on_the_probed_ports(pod: Pod, name: str) -> None:
    own = pod.containers[name]
    assert probe_ports(name) == {
        "livenessProbe": int(env(name)["METRICS_PORT"]["value"]),
        "readinessProbe": int(env(name)["METRICS_PORT"]["value"]),
    }
    statuses = [
        await asyncio.to_thread(http_status, own.metrics_port, p) for p in ("/healthz", "/readyz")
    ]
    assert statuses == [200, 200]


async def test_both_containers_stop_cleanly_on_sigterm_and_the_socket_goes(own_pod: Pod) -> None:
    pod = own_pod
    socket_path = pod.mapped("server", env("server")["DEVICE_API_SOCKET"]["value"])
    # The kubelet signals every container of the pod at once.
    for own in pod.containers.values():
        assert own.process is not None
        own.process.terminate()
    codes = {
        own.name: await asyncio.to_thread(own.process.wait, 30)
        for own in pod.containers.values()
        if own.process is not None
    }
    assert (codes, socket_path.exists()) == ({"server": 0, "provider": 0}, False), logs(pod)
