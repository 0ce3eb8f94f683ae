"""``dist/install-<feature>.yaml``: current, schema-valid, hardened, and documented.

``make manifests`` renders every overlay with ``kubectl kustomize`` (the kubectl that
``scripts/ensure-kubectl.sh`` provides) through ``scripts/render-manifests.py``, and
regenerates the tables of ``docs/deploy.md`` with ``scripts/deploy-docs.py``. These tests
render again into a temporary directory and compare, validate every document with
``kubernetes-validate`` (strict: unknown fields fail) for Kubernetes 1.24 and for the
newest version it ships, validate custom resources against our generated CRD schemas,
and hold the hardening exceptions to an explicit allow-list.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import kubernetes_validate
import pytest
import yaml
from jsonschema import ValidationError
from kubernetes_validate import utils as kv_utils
from openapi_schema_validator import OAS30Validator

import tests.integration.manifests_support as common
from tests.integration.manifests_support import Manifest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
DOC = ROOT / "docs" / "deploy.md"
EXAMPLES = ROOT / "examples" / "kcache"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DEFAULT_IMAGE = "ghcr.io/gpufleet/gpufleet"
FIX = "run `make manifests` and commit dist/ and docs/deploy.md"
OLDEST_KUBERNETES = "1.24"

# Every departure from the hardening baseline (runAsNonRoot, readOnlyRootFilesystem,
# capabilities drop ALL, seccomp RuntimeDefault, allowPrivilegeEscalation false; not
# privileged, no host namespace, no hostPath), per workload container, in any install.
# docs/deploy.md spells each out (scripts/deploy-reasons.yaml, "exceptions").
EXCEPTIONS: dict[tuple[str, str], set[str]] = {
    # uid 0 for the kubelet's root-owned pod-resources socket; host PIDs for NVML.
    ("DaemonSet/gpufleet-gpu-exporter", "exporter"): {"runAsNonRoot", "hostPID", "hostPath"},
    # Privileged: bind mounts with Bidirectional propagation into pods' volumes.
    ("DaemonSet/gpufleet-kcache-node", "node"): {
        "runAsNonRoot",
        "allowPrivilegeEscalation",
        "capabilities",
        "privileged",
        "hostPath",
    },
    # uid 0 for the kubelet's root-owned plugins_registry/.
    ("DaemonSet/gpufleet-kcache-node", "node-driver-registrar"): {"runAsNonRoot", "hostPath"},
    # uid 0 to create the socket in the root-owned hostPath; consumers share the directory.
    ("DaemonSet/gpufleet-device-api", "server"): {"runAsNonRoot", "hostPath"},
    ("DaemonSet/gpufleet-device-api", "provider"): {"hostPath"},
}


def _script(name: str) -> ModuleType:
    path = ROOT / "scripts" / name
    spec = importlib.util.spec_from_file_location(name.replace("-", "_").removesuffix(".py"), path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


deploy_docs = _script("deploy-docs.py")
render_manifests = _script("render-manifests.py")


def _render(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(os.environ.get("KUBECTL", "kubectl")) is None:
        pytest.fail("kubectl is not on PATH: run `scripts/ensure-kubectl.sh` (as root)")
    clean = {k: v for k, v in os.environ.items() if k != "IMAGE"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render-manifests.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**clean, **env},
    )


@functools.cache
def installs() -> dict[str, list[Manifest]]:
    """The committed install files and their documents."""
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(DIST.glob("install-*.yaml"))
    }


def install_names() -> list[str]:
    return sorted(path.name for path in DIST.glob("install-*.yaml"))


def workloads(documents: list[Manifest]) -> list[Manifest]:
    return [doc for doc in documents if doc["kind"] in common.WORKLOAD_KINDS]


def all_containers(documents: list[Manifest]) -> list[tuple[Manifest, Manifest, Manifest]]:
    """(workload, pod spec, container) for every container, init containers included."""
    out = []
    for workload in workloads(documents):
        spec = common.pod_spec(workload)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            out.append((workload, spec, container))
    return out


def is_gpufleet(container: Manifest) -> bool:
    return container.get("command", [""])[0] == "gpufleet"


# dist/ is current


def test_dist_matches_the_overlays(tmp_path: Path) -> None:
    result = _render(tmp_path)
    assert result.returncode == 0, result.stderr
    fresh = {p.name: p.read_text() for p in sorted(tmp_path.glob("install-*.yaml"))}
    committed = {p.name: p.read_text() for p in sorted(DIST.glob("install-*.yaml"))}
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert stale == [], f"dist/ is stale ({', '.join(stale)}): {FIX}"


def test_every_overlay_has_its_install_file() -> None:
    overlays = {p.parent.name for p in common.OVERLAYS_DIR.glob("*/kustomization.yaml")}
    assert {f"install-{name}.yaml" for name in overlays} == set(install_names()), FIX


def test_rendering_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert (_render(first).returncode, _render(second).returncode) == (0, 0)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == {
        p.name: p.read_bytes() for p in second.iterdir()
    }


def test_rendering_removes_the_file_of_an_overlay_that_is_gone(tmp_path: Path) -> None:
    (tmp_path / "install-removed-feature.yaml").write_text("kind: Namespace\n")
    assert _render(tmp_path).returncode == 0
    assert not (tmp_path / "install-removed-feature.yaml").exists()


def test_env_is_sorted_so_every_kustomize_renders_the_same_file() -> None:
    # kustomize 2 (kubectl 1.20) appends the env entries a patch adds, kustomize 5 puts
    # them first: sorted by name, both give the committed bytes.
    (deployment,) = [d for d in installs()["install-postgres.yaml"] if d["kind"] == "Deployment"]
    names = [entry["name"] for entry in common.pod_spec(deployment)["containers"][0]["env"]]
    assert names == sorted(names)


def test_an_env_value_that_refers_to_another_variable_is_refused() -> None:
    # Sorting would change what $(NAME) expands to.
    (deployment,) = copy.deepcopy(
        [d for d in installs()["install-stdout.yaml"] if d["kind"] == "Deployment"]
    )
    common.pod_spec(deployment)["containers"][0]["env"].append(
        {"name": "A_URL", "value": "http://$(POD_NAME):8080"}
    )
    with pytest.raises(render_manifests.RenderError, match="A_URL refers to another variable"):
        render_manifests.sort_env([deployment], "stdout")


@pytest.mark.parametrize("name", install_names())
def test_install_file_says_its_version_and_how_it_was_made(name: str) -> None:
    header = (DIST / name).read_text().split("\n---\n", 1)[0]
    assert (f"gpufleet {VERSION}" in header, "Generated by make manifests" in header) == (
        True,
        True,
    )


@pytest.mark.parametrize("name", install_names())
def test_gpufleet_containers_run_the_package_version_of_the_image(name: str) -> None:
    images = {c["image"] for _, _, c in all_containers(installs()[name]) if is_gpufleet(c)}
    assert images == {f"{DEFAULT_IMAGE}:{VERSION}"}


def test_image_variable_names_another_repository(tmp_path: Path) -> None:
    result = _render(tmp_path, IMAGE="registry.example.com:5000/team/gpufleet")
    assert result.returncode == 0, result.stderr
    documents = [
        doc for doc in yaml.safe_load_all((tmp_path / "install-kcache.yaml").read_text()) if doc
    ]
    images = {(is_gpufleet(c), c["image"].split(":")[0]) for _, _, c in all_containers(documents)}
    gpufleet = {c["image"] for _, _, c in all_containers(documents) if is_gpufleet(c)}
    assert gpufleet == {f"registry.example.com:5000/team/gpufleet:{VERSION}"}
    # The CSI registrar is not ours and keeps its image.
    assert (False, "registry.k8s.io/sig-storage/csi-node-driver-registrar") in images


def test_image_variable_with_a_tag_is_refused_in_one_line(tmp_path: Path) -> None:
    result = _render(tmp_path, IMAGE="registry.example.com/gpufleet:latest")
    assert (
        result.returncode,
        len(result.stderr.strip().splitlines()),
        "IMAGE" in result.stderr,
    ) == (
        2,
        1,
        True,
    )


def test_a_kubectl_that_fails_is_named_in_one_line_and_exit_1(tmp_path: Path) -> None:
    result = _render(tmp_path, KUBECTL=shutil.which("false") or "/bin/false")
    assert (result.returncode, len(result.stderr.strip().splitlines())) == (1, 1)
    assert "kubectl kustomize deploy/kustomize/overlays/" in result.stderr


def test_a_missing_kubectl_is_a_configuration_error(tmp_path: Path) -> None:
    result = _render(tmp_path, KUBECTL=str(tmp_path / "no-kubectl"))
    assert (result.returncode, "KUBECTL" in result.stderr, list(tmp_path.iterdir())) == (
        2,
        True,
        [],
    )


@pytest.mark.parametrize("name", install_names())
def test_namespaces_and_crds_come_before_what_needs_them(name: str) -> None:
    # `kubectl apply -f` creates the objects in file order.
    documents = installs()[name]
    namespaces = {
        doc["metadata"]["name"]: index
        for index, doc in enumerate(documents)
        if doc["kind"] == "Namespace"
    }
    crds = {
        (crd["spec"]["group"], crd["spec"]["names"]["kind"]): index
        for index, crd in enumerate(documents)
        if crd["kind"] == "CustomResourceDefinition"
    }
    late = [
        f"{doc['kind']}/{doc['metadata']['name']}"
        for index, doc in enumerate(documents)
        if index < namespaces.get(doc["metadata"].get("namespace", ""), -1)
        or index < crds.get((doc["apiVersion"].split("/")[0], doc["kind"]), -1)
    ]
    assert (late, bool(namespaces)) == ([], True)


# Schema validation


def newest_kubernetes() -> str:
    return kv_utils.major_minor(kv_utils.latest_version())


def kubernetes_versions() -> list[str]:
    return sorted({OLDEST_KUBERNETES, newest_kubernetes()})


def test_kubernetes_validate_ships_the_1_24_schemas() -> None:
    # It maps a version it lacks to an older one; 1.34 and later ship 1.25 onwards only.
    shipped = {kv_utils.major_minor(v) for v in kv_utils.all_versions()}
    assert OLDEST_KUBERNETES in shipped


def custom_resource_schemas(documents: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD version in ``documents``."""
    return {
        (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"]): version[
            "schema"
        ]["openAPIV3Schema"]
        for crd in documents
        if crd["kind"] == "CustomResourceDefinition"
        for version in crd["spec"]["versions"]
    }


def validate(doc: Manifest, version: str, crds: dict[tuple[str, str], Manifest]) -> str:
    """Validate one document; the schema it was checked against. Raises on any failure."""
    key = (doc["apiVersion"], doc["kind"])
    if key in crds:
        OAS30Validator(crds[key]).validate(doc)
        return f"CRD {doc['apiVersion']}"
    return str(kubernetes_validate.validate(doc, version, strict=True))


@pytest.mark.parametrize("version", kubernetes_versions())
@pytest.mark.parametrize("name", install_names())
def test_every_document_passes_schema_validation(name: str, version: str) -> None:
    documents = installs()[name]
    crds = custom_resource_schemas(documents)
    failures = []
    for doc in documents:
        try:
            checked = validate(doc, version, crds)
        except Exception as error:  # every kind of failure is reported
            failures.append(
                f"{doc['kind']}/{doc['metadata']['name']}: {getattr(error, 'message', error)}"
            )
            continue
        assert checked in {version, f"CRD {doc['apiVersion']}"}
    assert failures == []


@pytest.mark.parametrize("version", kubernetes_versions())
def test_schema_validation_refuses_an_unknown_field(version: str) -> None:
    (deployment, *_) = [d for d in installs()["install-stdout.yaml"] if d["kind"] == "Deployment"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def kcache_examples() -> list[Manifest]:
    return [
        doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["apiVersion"].startswith("gkm.io/")
    ]


def test_custom_resources_validate_against_the_shipped_crd_schemas() -> None:
    crds = custom_resource_schemas(installs()["install-kcache.yaml"])
    examples = kcache_examples()
    assert examples, "examples/kcache has no gkm.io object"
    assert {validate(doc, OLDEST_KUBERNETES, crds) for doc in examples} == {"CRD gkm.io/v1alpha1"}


def test_a_custom_resource_that_breaks_the_crd_schema_is_refused() -> None:
    crds = custom_resource_schemas(installs()["install-kcache.yaml"])
    broken = copy.deepcopy(kcache_examples()[0])
    broken["spec"]["image"] = 42
    with pytest.raises(ValidationError):
        validate(broken, OLDEST_KUBERNETES, crds)


# Hardening


def baseline_departures(spec: Manifest, container: Manifest) -> set[str]:
    """What a container departs from the hardening baseline in, by setting name."""
    security = container.get("securityContext", {})
    capabilities = security.get("capabilities") or {}
    found = {
        name
        for name, ok in {
            "runAsNonRoot": common.effective_security(spec, container, "runAsNonRoot") is True,
            "readOnlyRootFilesystem": security.get("readOnlyRootFilesystem") is True,
            "capabilities": capabilities.get("drop") == ["ALL"] and not capabilities.get("add"),
            "seccompProfile": (
                common.effective_security(spec, container, "seccompProfile") or {}
            ).get("type")
            == "RuntimeDefault",
            "allowPrivilegeEscalation": security.get("allowPrivilegeEscalation") is False,
            "privileged": not security.get("privileged"),
        }.items()
        if not ok
    }
    found |= {field for field in ("hostPID", "hostNetwork", "hostIPC") if spec.get(field)}
    host_volumes = {v["name"] for v in spec.get("volumes", []) if "hostPath" in v}
    if any(m["name"] in host_volumes for m in container.get("volumeMounts", [])):
        found.add("hostPath")
    return found


def test_every_container_is_hardened_but_the_allow_listed_exceptions() -> None:
    departures: dict[tuple[str, str], set[str]] = {}
    rendered: set[tuple[str, str]] = set()
    for documents in installs().values():
        for workload, spec, container in all_containers(documents):
            found = baseline_departures(spec, container)
            key = (f"{workload['kind']}/{workload['metadata']['name']}", container["name"])
            rendered.add(key)
            if found:
                departures.setdefault(key, set()).update(found)
    # An exception of a workload that is not rendered (an overlay still on its branch) waits.
    assert departures == {key: allowed for key, allowed in EXCEPTIONS.items() if key in rendered}


def test_every_exception_is_spelled_out_with_a_reason() -> None:
    reasons = deploy_docs.load_reasons()
    written = {(e.workload, e.container): set(e.settings) for e in reasons.exceptions if e.why}
    assert written == EXCEPTIONS


def test_only_workloads_with_exceptions_run_in_privileged_namespaces() -> None:
    namespaces = {
        doc["metadata"]["name"]: doc["metadata"]
        .get("labels", {})
        .get("pod-security.kubernetes.io/enforce")
        for documents in installs().values()
        for doc in documents
        if doc["kind"] == "Namespace"
    }
    excepted = {workload for workload, _ in EXCEPTIONS}
    placed = {
        (f"{w['kind']}/{w['metadata']['name']}", w["metadata"]["namespace"])
        for documents in installs().values()
        for w in workloads(documents)
    }
    # An exception needs a "privileged" namespace; every other workload is under "restricted".
    assert {
        (workload, namespaces[namespace] == "privileged") for workload, namespace in placed
    } == {(workload, workload in excepted) for workload, _ in placed}


# docs/deploy.md


def test_deploy_docs_tables_are_current() -> None:
    block = deploy_docs.generate(deploy_docs.load_installs(DIST), deploy_docs.load_reasons())
    assert deploy_docs.splice(DOC.read_text(), block) == DOC.read_text(), (
        f"docs/deploy.md is stale: {FIX}"
    )


def test_every_rbac_rule_has_a_reason() -> None:
    reasons = deploy_docs.load_reasons()
    missing: list[str] = []
    for documents in installs().values():
        deploy_docs.permission_rows(documents, reasons, missing)
    assert missing == []


def test_every_reason_explains_a_rule_that_exists() -> None:
    granted = {
        (rule.kind + "/" + name, rule.api_group, rule.resource, rule.resource_name, rule.verb)
        for documents in installs().values()
        for role in documents
        if role["kind"] in ("Role", "ClusterRole")
        for name in [role["metadata"]["name"]]
        for rule in _rules(role)
    }
    unused = [
        f"{r.role} {r.api_group}/{sorted(r.resources)}"
        for r in deploy_docs.load_reasons().permissions
        if not any(
            r.covers(role, group, resource, frozenset([n] if n else []), verb)
            for role, group, resource, n, verb in granted
        )
    ]
    assert unused == []


def _rules(role: Manifest) -> list[common.Rule]:
    namespace = role["metadata"].get("namespace", "")
    return [
        common.Rule(role["kind"], namespace, group, resource, verb, name)
        for rule in role.get("rules") or []
        for group in rule.get("apiGroups", [""])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
        for name in rule.get("resourceNames") or [""]
    ]


def test_a_rule_without_a_reason_stops_the_docs() -> None:
    documents = copy.deepcopy(installs()["install-agent.yaml"])
    (role,) = [d for d in documents if d["kind"] == "ClusterRole"]
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]})
    with pytest.raises(deploy_docs.DocsError, match="gpufleet-inventory-nodes: core/secrets list"):
        deploy_docs.generate({"install-agent.yaml": documents}, deploy_docs.load_reasons())


def test_an_exception_without_a_reason_stops_the_docs() -> None:
    documents = copy.deepcopy(installs()["install-agent.yaml"])
    (daemonset,) = workloads(documents)
    common.pod_spec(daemonset)["containers"][0]["securityContext"]["privileged"] = True
    with pytest.raises(deploy_docs.DocsError, match="gpufleet-inventory-agent container agent"):
        deploy_docs.generate({"install-agent.yaml": documents}, deploy_docs.load_reasons())


def run_deploy_docs(doc: Path) -> subprocess.CompletedProcess[str]:
    """``scripts/deploy-docs.py --doc DOC`` as a subprocess, its output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "deploy-docs.py"), "--doc", str(doc)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_deploy_docs_keeps_the_prose_around_the_tables(tmp_path: Path) -> None:
    doc = tmp_path / "deploy.md"
    doc.write_text(f"before\n{deploy_docs.BEGIN}\nSTALE-TABLE\n{deploy_docs.END}\nafter\n")
    result = run_deploy_docs(doc)
    text = doc.read_text()
    assert (result.returncode, text.startswith("before\n"), text.endswith("\nafter\n")) == (
        0,
        True,
        True,
    )
    assert ("STALE-TABLE" in text, "`dist/install-agent.yaml`" in text) == (False, True)


def test_deploy_docs_without_markers_fails_in_one_line(tmp_path: Path) -> None:
    doc = tmp_path / "deploy.md"
    doc.write_text("no markers here\n")
    result = run_deploy_docs(doc)
    assert (result.returncode, len(result.stderr.strip().splitlines())) == (2, 1)
    assert str(doc) in result.stderr


def test_readme_install_section_names_every_install_file() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install in a cluster", 1)[1].split("\n## ", 1)[0]
    assert [name for name in install_names() if f"dist/{name}" not in section] == []
    assert ("make manifests" in section, "IMAGE=" in section) == (True, True)
