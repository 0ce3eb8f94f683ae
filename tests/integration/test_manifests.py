"""The kustomize manifests in ``deploy/kustomize``, rendered by the real ``kubectl kustomize``.

Every overlay is rendered with whatever ``kubectl`` is on PATH (``KUBECTL`` overrides it);
Debian 12's kubectl 1.20, installed by ``scripts/ensure-kubectl.sh``, has the oldest
kustomize the manifests are written for. The RBAC of each overlay is compared with the
minimal set written out below, so any extra permission fails a test.

The inventory overlays share one namespace (``gpufleet``, "restricted" Pod Security) and
one set of conventions; the GPU exporter overlay (``gpu-exporter``) needs hostPID and
hostPath, so it has its own namespace and its own tests, and joins only the checks that
hold for every gpufleet workload.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices

from gpufleet.exporter.settings import ExporterSettings
from tests.integration.manifests_support import (
    DEVICE_API,
    IMAGE,
    OVERLAYS_DIR,
    WORKLOAD_KINDS,
    Manifest,
    Rule,
    containers,
    effective_security,
    env_of,
    kustomize,
    objects,
    pod_spec,
    render,
    the_daemonset,
)

pytestmark = pytest.mark.integration

CONTROLLER_OVERLAYS = ("stdout", "postgres", "s3", "http", "labels", "check")
INVENTORY_OVERLAYS = (*CONTROLLER_OVERLAYS, "agent")
GPU_EXPORTER = "gpu-exporter"
# The device API (server + NVML provider, two containers, a hostPath socket directory):
# the checks below that hold for every gpufleet workload, and its own tests in
# test_manifests_device_api.py.
OVERLAYS = (*INVENTORY_OVERLAYS, GPU_EXPORTER, DEVICE_API)
# The kernel cache's overlay (CRDs, a privileged CSI DaemonSet): tests of its own in
# test_manifests_kcache.py.
KCACHE = "kcache"
# DaemonSets on GPU nodes that read NVML through the NVIDIA runtime.
NODE_OVERLAYS = ("agent", GPU_EXPORTER)

EXPORTER_TYPE = {
    "stdout": "stdout",
    "postgres": "postgres",
    "s3": "s3",
    "http": "http",
    "labels": "stdout",
    "check": "stdout",
    "agent": "stdout",
}

INVENTORY_NAMESPACE = "gpufleet"
GPU_EXPORTER_NAMESPACE = "gpufleet-gpu-exporter"
GPU_EXPORTER_APP = "gpufleet-gpu-exporter"  # its app.kubernetes.io/name
GPU_EXPORTER_PORT = 9400
# The exporter's host mounts: host path -> mount path, all read-only.
GPU_EXPORTER_HOST_PATHS = {
    "/proc": "/host/proc",
    "/var/lib/kubelet/pod-resources": "/var/lib/kubelet/pod-resources",
}
DEVICE_PLUGIN_NAMESPACE = "gpu-operator"
LEASE_NAME = "gpufleet-inventory-leader"


def _rules(kind: str, namespace: str, group: str, resource: str, *verbs: str) -> set[Rule]:
    return {Rule(kind, namespace, group, resource, verb) for verb in verbs}


# The minimal permissions of each overlay, written out. Why each one exists: docs/deploy.md.
NODES_READ = _rules("ClusterRole", "", "", "nodes", "get", "list", "watch")
DEVICE_PLUGIN_PODS = _rules("Role", "gpu-operator", "", "pods", "get", "list", "watch") | _rules(
    "Role", "gpu-operator", "", "pods/exec", "create", "get"
)
LEADER_LEASE = {
    Rule("Role", "gpufleet", "coordination.k8s.io", "leases", "create"),
    Rule("Role", "gpufleet", "coordination.k8s.io", "leases", "get", LEASE_NAME),
    Rule("Role", "gpufleet", "coordination.k8s.io", "leases", "update", LEASE_NAME),
}
CONTROLLER = NODES_READ | DEVICE_PLUGIN_PODS | LEADER_LEASE
EXPECTED_RBAC = {
    "stdout": CONTROLLER,
    "postgres": CONTROLLER,
    "s3": CONTROLLER,
    "http": CONTROLLER,
    "labels": CONTROLLER | _rules("ClusterRole", "", "", "nodes", "patch"),
    "check": CONTROLLER | _rules("Role", "gpu-operator", "", "pods", "delete"),
    "agent": _rules("ClusterRole", "", "", "nodes", "get"),
    # The pod informer of its own node (fieldSelector spec.nodeName): pods span every
    # namespace, so cluster-wide, read-only. ResourceSlices (cluster-scoped) of its
    # node likewise: they map DRA-allocated devices to GPU UUIDs.
    GPU_EXPORTER: _rules("ClusterRole", "", "", "pods", "get", "list", "watch")
    | _rules("ClusterRole", "", "resource.k8s.io", "resourceslices", "get", "list", "watch"),
    # Neither the server nor the provider calls the Kubernetes API.
    DEVICE_API: set(),
}


def rbac_rules(overlay: str) -> set[Rule]:
    """Every permission granted by the overlay's Roles and ClusterRoles, one verb per entry."""
    granted: set[Rule] = set()
    for role in objects(overlay, "Role", "ClusterRole"):
        namespace = role["metadata"].get("namespace", "") if role["kind"] == "Role" else ""
        for rule in role.get("rules") or []:
            resources = [*rule.get("resources", []), *rule.get("nonResourceURLs", [])]
            for group in rule.get("apiGroups", [""]):
                for resource in resources:
                    for verb in rule.get("verbs", []):
                        for name in rule.get("resourceNames") or [""]:
                            granted.add(Rule(role["kind"], namespace, group, resource, verb, name))
    return granted


def the_container(overlay: str) -> Manifest:
    """The one container of the overlay's one workload."""
    found = [container for _, container in containers(overlay)]
    assert len(found) == 1, f"overlays/{overlay}: expected one container, found {len(found)}"
    return found[0]


def setting_names() -> set[str]:
    """The environment variables `ExporterSettings` reads (an alias, else the field name)."""
    names: set[str] = set()
    for field, info in ExporterSettings.model_fields.items():
        alias = info.validation_alias
        if alias is None:
            names.add(field.upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(choice.upper() for choice in alias.choices if isinstance(choice, str))
    return names


# Rendering


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_with_kubectl_kustomize(overlay: str) -> None:
    assert objects(overlay, *WORKLOAD_KINDS), f"overlays/{overlay} renders no workload"


def test_every_overlay_directory_is_tested() -> None:
    on_disk = {path.parent.name for path in OVERLAYS_DIR.glob("*/kustomization.yaml")}
    assert on_disk == {*OVERLAYS, KCACHE}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_ships_no_secret_objects(overlay: str) -> None:
    assert objects(overlay, "Secret") == []


# RBAC: least privilege


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_grants_exactly_its_minimal_rbac_rules(overlay: str) -> None:
    assert rbac_rules(overlay) == EXPECTED_RBAC[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_exec_is_never_granted_cluster_wide(overlay: str) -> None:
    cluster_wide = {rule.resource for rule in rbac_rules(overlay) if rule.kind == "ClusterRole"}
    assert "pods/exec" not in cluster_wide


@pytest.mark.parametrize("overlay", INVENTORY_OVERLAYS)
def test_pods_permissions_are_confined_to_the_device_plugin_namespace(overlay: str) -> None:
    namespaces = {
        (rule.kind, rule.namespace)
        for rule in rbac_rules(overlay)
        if rule.resource in {"pods", "pods/exec"}
    }
    assert namespaces <= {("Role", DEVICE_PLUGIN_NAMESPACE)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nodes_patch_is_granted_only_by_the_labels_overlay(overlay: str) -> None:
    patches_nodes = any(r.resource == "nodes" and r.verb == "patch" for r in rbac_rules(overlay))
    assert patches_nodes == (overlay == "labels")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_delete_is_granted_only_by_the_check_overlay(overlay: str) -> None:
    deletes_pods = any(r.resource == "pods" and r.verb == "delete" for r in rbac_rules(overlay))
    assert deletes_pods == (overlay == "check")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_rbac_rule_uses_a_wildcard(overlay: str) -> None:
    assert not any("*" in field for rule in rbac_rules(overlay) for field in rule)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_binding_refers_to_a_role_that_exists(overlay: str) -> None:
    roles = {
        (role["kind"], role["metadata"].get("namespace", ""), role["metadata"]["name"])
        for role in objects(overlay, "Role", "ClusterRole")
    }
    dangling = [
        binding["metadata"]["name"]
        for binding in objects(overlay, "RoleBinding", "ClusterRoleBinding")
        if (
            binding["roleRef"]["kind"],
            binding["metadata"].get("namespace", "")
            if binding["roleRef"]["kind"] == "Role"
            else "",
            binding["roleRef"]["name"],
        )
        not in roles
    ]
    assert dangling == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_binding_subject_is_a_service_account_that_exists(overlay: str) -> None:
    accounts = {
        ("ServiceAccount", sa["metadata"]["namespace"], sa["metadata"]["name"])
        for sa in objects(overlay, "ServiceAccount")
    }
    subjects = {
        (subject["kind"], subject.get("namespace", ""), subject["name"])
        for binding in objects(overlay, "RoleBinding", "ClusterRoleBinding")
        for subject in binding["subjects"]
    }
    assert subjects - accounts == set()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_role_is_bound(overlay: str) -> None:
    roles = {
        (role["kind"], role["metadata"].get("namespace", ""), role["metadata"]["name"])
        for role in objects(overlay, "Role", "ClusterRole")
    }
    bound = {
        (
            binding["roleRef"]["kind"],
            binding["metadata"].get("namespace", "")
            if binding["roleRef"]["kind"] == "Role"
            else "",
            binding["roleRef"]["name"],
        )
        for binding in objects(overlay, "RoleBinding", "ClusterRoleBinding")
    }
    assert roles - bound == set()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_runs_as_a_service_account_that_exists(overlay: str) -> None:
    accounts = {
        (sa["metadata"]["namespace"], sa["metadata"]["name"])
        for sa in objects(overlay, "ServiceAccount")
    }
    used = {
        (workload["metadata"]["namespace"], pod_spec(workload).get("serviceAccountName", "default"))
        for workload in objects(overlay, *WORKLOAD_KINDS)
    }
    assert used <= accounts


@pytest.mark.parametrize("overlay", CONTROLLER_OVERLAYS)
def test_exec_role_lives_in_the_namespace_the_controller_watches(overlay: str) -> None:
    watched = env_of(the_container(overlay))["NAMESPACE"]["value"]
    assert {rule.namespace for rule in rbac_rules(overlay) if rule.resource == "pods/exec"} == {
        watched
    }


@pytest.mark.parametrize("overlay", CONTROLLER_OVERLAYS)
def test_leader_lease_role_names_the_lease_the_controller_uses(overlay: str) -> None:
    lease = env_of(the_container(overlay))["LEASE_NAME"]["value"]
    named = {rule.resource_name for rule in rbac_rules(overlay) if rule.resource == "leases"}
    assert named == {"", lease}


# Container hardening


@pytest.mark.parametrize("overlay", INVENTORY_OVERLAYS)
def test_every_container_runs_as_non_root_uid_65532(overlay: str) -> None:
    settings = {
        (
            effective_security(spec, container, "runAsNonRoot"),
            effective_security(spec, container, "runAsUser"),
        )
        for spec, container in containers(overlay)
    }
    assert settings == {(True, 65532)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_a_read_only_root_filesystem(overlay: str) -> None:
    settings = {
        container.get("securityContext", {}).get("readOnlyRootFilesystem")
        for _, container in containers(overlay)
    }
    assert settings == {True}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_forbids_privilege_escalation(overlay: str) -> None:
    settings = {
        container.get("securityContext", {}).get("allowPrivilegeEscalation")
        for _, container in containers(overlay)
    }
    assert settings == {False}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_drops_all_capabilities_and_adds_none(overlay: str) -> None:
    capabilities = [
        container.get("securityContext", {}).get("capabilities", {})
        for _, container in containers(overlay)
    ]
    assert all(c.get("drop") == ["ALL"] and not c.get("add") for c in capabilities), capabilities


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_container_is_privileged(overlay: str) -> None:
    privileged = [
        container["name"]
        for _, container in containers(overlay)
        if container.get("securityContext", {}).get("privileged")
    ]
    assert privileged == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_uses_the_runtime_default_seccomp_profile(overlay: str) -> None:
    profiles = {
        (effective_security(spec, container, "seccompProfile") or {}).get("type")
        for spec, container in containers(overlay)
    }
    assert profiles == {"RuntimeDefault"}


@pytest.mark.parametrize("overlay", INVENTORY_OVERLAYS)
def test_no_pod_uses_host_namespaces_or_host_paths(overlay: str) -> None:
    hosty = [
        workload["metadata"]["name"]
        for workload in objects(overlay, *WORKLOAD_KINDS)
        if any(pod_spec(workload).get(f) for f in ("hostNetwork", "hostPID", "hostIPC"))
        or any("hostPath" in volume for volume in pod_spec(workload).get("volumes", []))
    ]
    assert hosty == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_probes_healthz_for_liveness_and_readyz_for_readiness(
    overlay: str,
) -> None:
    probes = {
        (
            container.get("livenessProbe", {}).get("httpGet", {}).get("path"),
            container.get("readinessProbe", {}).get("httpGet", {}).get("path"),
        )
        for _, container in containers(overlay)
    }
    assert probes == {("/healthz", "/readyz")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_sets_resource_requests_and_limits(overlay: str) -> None:
    resources = [container.get("resources", {}) for _, container in containers(overlay)]
    assert all(
        {"cpu", "memory"} <= set(r.get("requests", {}))
        and {"cpu", "memory"} <= set(r.get("limits", {}))
        for r in resources
    ), resources


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_the_released_gpufleet_image(overlay: str) -> None:
    assert {container["image"] for _, container in containers(overlay)} == {IMAGE}


@pytest.mark.parametrize("overlay", INVENTORY_OVERLAYS)
def test_spool_dir_is_on_a_writable_volume(overlay: str) -> None:
    for spec, container in containers(overlay):
        spool_dir = env_of(container)["SPOOL_DIR"]["value"]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        writable = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        assert any(
            spool_dir.startswith(path.rstrip("/") + "/") and name in writable
            for path, name in mounts.items()
        ), f"{container['name']}: SPOOL_DIR={spool_dir} is not under a writable mount"


@pytest.mark.parametrize("overlay", INVENTORY_OVERLAYS)
def test_metrics_service_exposes_port_8080_named_metrics(overlay: str) -> None:
    ports = {
        (port["name"], port["port"])
        for service in objects(overlay, "Service")
        for port in service["spec"]["ports"]
    }
    assert ports == {("metrics", 8080)}


# Configuration


@pytest.mark.parametrize("overlay", INVENTORY_OVERLAYS)
def test_every_container_exports_with_the_overlays_exporter_type(overlay: str) -> None:
    types = {env_of(container)["EXPORTER_TYPE"]["value"] for _, container in containers(overlay)}
    assert types == {EXPORTER_TYPE[overlay]}


@pytest.mark.parametrize(
    ("overlay", "variable", "secret"),
    [
        ("postgres", "POSTGRES_PASSWORD", "gpufleet-postgres"),
        ("http", "HTTP_AUTH_TOKEN", "gpufleet-http"),
    ],
)
def test_exporter_secret_comes_from_a_secret_key_ref(
    overlay: str, variable: str, secret: str
) -> None:
    entry = env_of(the_container(overlay))[variable]
    assert entry.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == secret


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_written_inline_in_the_env(overlay: str) -> None:
    inline = [
        name
        for _, container in containers(overlay)
        for name, entry in env_of(container).items()
        if any(word in name for word in ("PASSWORD", "TOKEN", "SECRET")) and "value" in entry
    ]
    assert inline == []


@pytest.mark.parametrize(
    ("overlay", "required"),
    [
        (
            "postgres",
            {"POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_USER", "POSTGRES_SSLMODE"},
        ),
        ("s3", {"S3_BUCKET", "S3_PREFIX", "S3_REGION", "S3_PARTITION_PATTERN", "S3_COMPRESS"}),
        ("http", {"HTTP_ENDPOINT", "HTTP_TIMEOUT"}),
    ],
)
def test_exporter_overlay_sets_its_exporter_settings(overlay: str, required: set[str]) -> None:
    assert required <= set(env_of(the_container(overlay)))


@pytest.mark.parametrize("overlay", CONTROLLER_OVERLAYS)
def test_controller_overlay_runs_two_replicas(overlay: str) -> None:
    assert [d["spec"]["replicas"] for d in objects(overlay, "Deployment")] == [2]


@pytest.mark.parametrize("overlay", CONTROLLER_OVERLAYS)
def test_controller_overlay_enables_leader_election(overlay: str) -> None:
    assert env_of(the_container(overlay))["LEADER_ELECTION"]["value"] == "true"


@pytest.mark.parametrize("overlay", CONTROLLER_OVERLAYS)
def test_controller_replicas_prefer_different_nodes(overlay: str) -> None:
    (deployment,) = objects(overlay, "Deployment")
    anti = pod_spec(deployment)["affinity"]["podAntiAffinity"]
    terms = [
        *anti.get("requiredDuringSchedulingIgnoredDuringExecution", []),
        *(
            t["podAffinityTerm"]
            for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        ),
    ]
    assert "kubernetes.io/hostname" in {term["topologyKey"] for term in terms}


@pytest.mark.parametrize("overlay", CONTROLLER_OVERLAYS)
def test_controller_reads_pod_identity_from_the_downward_api(overlay: str) -> None:
    env = env_of(the_container(overlay))
    fields = {
        name: env[name]["valueFrom"]["fieldRef"]["fieldPath"]
        for name in ("POD_NAME", "POD_NAMESPACE")
    }
    assert fields == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_node_labels_are_written_only_by_the_labels_overlay(overlay: str) -> None:
    node_labels = {env_of(c).get("NODE_LABELS", {}).get("value") for _, c in containers(overlay)}
    assert ("true" in node_labels) == (overlay == "labels")


def test_check_overlay_runs_check_mode_and_restarts_failing_pods() -> None:
    container = the_container("check")
    env = env_of(container)
    assert (container["args"], env["FORCE_RESTART"]["value"], bool(env["COMMAND"]["value"])) == (
        ["inventory", "check"],
        "true",
        True,
    )


@pytest.mark.parametrize("overlay", [o for o in CONTROLLER_OVERLAYS if o != "check"])
def test_controller_overlay_runs_controller_mode(overlay: str) -> None:
    assert the_container(overlay)["args"] == ["inventory", "controller"]


# The node agent


def test_agent_renders_a_daemonset_and_no_deployment() -> None:
    kinds = {obj["kind"] for obj in objects("agent", *WORKLOAD_KINDS)}
    assert kinds == {"DaemonSet"}


def test_agent_has_no_pods_permission_at_all() -> None:
    assert not any(rule.resource.startswith("pods") for rule in rbac_rules("agent"))


def test_agent_runs_agent_mode_with_its_node_name_from_the_downward_api() -> None:
    container = the_container("agent")
    field = env_of(container)["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert (container["args"], field) == (["inventory", "agent"], "spec.nodeName")


# GPU-node DaemonSets: the agent and the GPU exporter


@pytest.mark.parametrize("overlay", NODE_OVERLAYS)
def test_node_daemonset_runs_only_on_gpu_nodes_and_tolerates_their_taint(overlay: str) -> None:
    (daemonset,) = objects(overlay, "DaemonSet")
    spec = pod_spec(daemonset)
    tolerated = {toleration["key"] for toleration in spec.get("tolerations", [])}
    assert (spec["nodeSelector"], "nvidia.com/gpu" in tolerated) == (
        {"nvidia.com/gpu.present": "true"},
        True,
    )


@pytest.mark.parametrize("overlay", NODE_OVERLAYS)
def test_node_daemonset_asks_the_nvidia_runtime_for_nvml_only(overlay: str) -> None:
    (daemonset,) = objects(overlay, "DaemonSet")
    assert pod_spec(daemonset)["runtimeClassName"] == "nvidia"
    env = env_of(the_container(overlay))
    requested = {
        name: env[name]["value"]
        for name in ("NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")
    }
    assert requested == {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "utility"}


@pytest.mark.parametrize("overlay", NODE_OVERLAYS)
def test_node_daemonset_requests_no_gpu(overlay: str) -> None:
    resources = the_container(overlay)["resources"]
    assert not any(
        name.startswith("nvidia.com/")
        for section in ("requests", "limits")
        for name in resources.get(section, {})
    )


# Namespaces: "restricted" for the inventory, "privileged" only for the GPU exporter


@pytest.mark.parametrize("overlay", INVENTORY_OVERLAYS)
def test_inventory_namespace_enforces_the_restricted_profile(overlay: str) -> None:
    namespaces = {
        ns["metadata"]["name"]: ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce")
        for ns in objects(overlay, "Namespace")
    }
    assert namespaces == {INVENTORY_NAMESPACE: "restricted"}


@pytest.mark.parametrize("overlay", INVENTORY_OVERLAYS)
def test_inventory_puts_nothing_in_the_gpu_exporter_namespace(overlay: str) -> None:
    intruders = [
        f"{obj['kind']}/{obj['metadata']['name']}"
        for obj in render(overlay)
        if obj["metadata"].get("namespace") == GPU_EXPORTER_NAMESPACE
        or any(s.get("namespace") == GPU_EXPORTER_NAMESPACE for s in obj.get("subjects", []))
    ]
    assert intruders == []


def test_gpu_exporter_namespace_is_its_own_and_enforces_privileged() -> None:
    (namespace,) = objects(GPU_EXPORTER, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert (namespace["metadata"]["name"], labels["pod-security.kubernetes.io/enforce"]) == (
        GPU_EXPORTER_NAMESPACE,
        "privileged",
    )


def test_gpu_exporter_namespace_holds_only_the_exporters_objects() -> None:
    namespaced = [obj for obj in render(GPU_EXPORTER) if "namespace" in obj["metadata"]]
    misplaced = [
        f"{obj['kind']}/{obj['metadata']['name']}"
        for obj in namespaced
        if obj["metadata"]["namespace"] != GPU_EXPORTER_NAMESPACE
        or obj["metadata"]["labels"]["app.kubernetes.io/name"] != GPU_EXPORTER_APP
    ]
    assert (misplaced, {obj["kind"] for obj in namespaced}) == (
        [],
        {"ServiceAccount", "DaemonSet", "Service"},
    )


def test_gpu_exporter_objects_all_carry_its_labels() -> None:
    unlabelled = [
        f"{obj['kind']}/{obj['metadata']['name']}"
        for obj in render(GPU_EXPORTER)
        if obj["metadata"].get("labels", {}).get("app.kubernetes.io/name") != GPU_EXPORTER_APP
        or obj["metadata"]["labels"].get("app.kubernetes.io/part-of") != "gpufleet"
    ]
    assert unlabelled == []


# The GPU exporter


def test_gpu_exporter_renders_one_daemonset_and_no_other_workload() -> None:
    workloads = [(w["kind"], w["metadata"]["name"]) for w in objects(GPU_EXPORTER, *WORKLOAD_KINDS)]
    assert workloads == [("DaemonSet", GPU_EXPORTER_APP)]


def test_gpu_exporter_runs_the_exporter_command() -> None:
    container = the_container(GPU_EXPORTER)
    assert (container["command"], container["args"]) == (["gpufleet"], ["exporter"])


def test_gpu_exporter_may_only_read_pods_and_resource_slices_cluster_wide() -> None:
    assert rbac_rules(GPU_EXPORTER) == {
        Rule("ClusterRole", "", group, resource, verb)
        for group, resource in (("", "pods"), ("resource.k8s.io", "resourceslices"))
        for verb in ("get", "list", "watch")
    }


def test_gpu_exporter_pods_role_is_bound_to_the_daemonsets_service_account() -> None:
    account = pod_spec(the_daemonset(GPU_EXPORTER))["serviceAccountName"]
    subjects = [
        (binding["roleRef"]["kind"], subject["kind"], subject["namespace"], subject["name"])
        for binding in objects(GPU_EXPORTER, "RoleBinding", "ClusterRoleBinding")
        for subject in binding["subjects"]
    ]
    assert subjects == [("ClusterRole", "ServiceAccount", GPU_EXPORTER_NAMESPACE, account)]


def test_gpu_exporter_shares_only_the_host_pid_namespace() -> None:
    spec = pod_spec(the_daemonset(GPU_EXPORTER))
    shared = {field: bool(spec.get(field)) for field in ("hostPID", "hostNetwork", "hostIPC")}
    assert shared == {"hostPID": True, "hostNetwork": False, "hostIPC": False}


def test_gpu_exporter_mounts_only_proc_and_pod_resources_from_the_host_read_only() -> None:
    spec = pod_spec(the_daemonset(GPU_EXPORTER))
    host_volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounted = {
        host_volumes[mount["name"]]: (mount["mountPath"], mount.get("readOnly", False))
        for _, container in containers(GPU_EXPORTER)
        for mount in container.get("volumeMounts", [])
        if mount["name"] in host_volumes
    }
    assert mounted == {host: (path, True) for host, path in GPU_EXPORTER_HOST_PATHS.items()}


def test_gpu_exporter_env_points_at_its_host_mounts() -> None:
    container = the_container(GPU_EXPORTER)
    env = env_of(container)
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    host_proc = env["GPU_EXPORTER_HOST_PROC"]["value"]
    socket = Path(env["GPU_EXPORTER_PODRESOURCES_SOCKET"]["value"])
    assert (host_proc in mounts, str(socket.parent) in mounts) == (True, True)
    assert (host_proc, str(socket.parent)) == (
        GPU_EXPORTER_HOST_PATHS["/proc"],
        GPU_EXPORTER_HOST_PATHS["/var/lib/kubelet/pod-resources"],
    )


def test_gpu_exporter_is_an_unprivileged_root() -> None:
    # uid 0 only to connect to the kubelet's root-owned socket; nothing else of root.
    spec = pod_spec(the_daemonset(GPU_EXPORTER))
    container = the_container(GPU_EXPORTER)
    security = container["securityContext"]
    assert {
        "runAsUser": effective_security(spec, container, "runAsUser"),
        "privileged": security.get("privileged", False),
        "allowPrivilegeEscalation": security.get("allowPrivilegeEscalation"),
        "readOnlyRootFilesystem": security.get("readOnlyRootFilesystem"),
        "capabilities": security.get("capabilities"),
        "seccomp": (effective_security(spec, container, "seccompProfile") or {}).get("type"),
    } == {
        "runAsUser": 0,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccomp": "RuntimeDefault",
    }


def test_gpu_exporter_reads_its_node_name_from_the_downward_api() -> None:
    entry = env_of(the_container(GPU_EXPORTER))["NODE_NAME"]
    assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_gpu_exporter_serves_metrics_on_port_9400() -> None:
    container = the_container(GPU_EXPORTER)
    ports = {(p["name"], p["containerPort"]) for p in container["ports"]}
    configured = int(env_of(container)["GPU_EXPORTER_PORT"]["value"])
    assert (ports, configured) == ({("metrics", GPU_EXPORTER_PORT)}, GPU_EXPORTER_PORT)


def test_gpu_exporter_probes_its_metrics_port() -> None:
    container = the_container(GPU_EXPORTER)
    probes = {
        kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
        for kind in ("livenessProbe", "readinessProbe")
    }
    assert probes == {
        "livenessProbe": ("/healthz", "metrics"),
        "readinessProbe": ("/readyz", "metrics"),
    }


def test_gpu_exporter_requests_little_and_is_limited() -> None:
    assert the_container(GPU_EXPORTER)["resources"] == {
        "requests": {"cpu": "20m", "memory": "64Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }


def test_gpu_exporter_service_selects_its_pods_and_targets_the_metrics_port() -> None:
    (service,) = objects(GPU_EXPORTER, "Service")
    pod_labels = the_daemonset(GPU_EXPORTER)["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    ports = [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]]
    assert (service["spec"]["type"], selector.items() <= pod_labels.items(), ports) == (
        "ClusterIP",
        True,
        [("metrics", GPU_EXPORTER_PORT, "metrics")],
    )


@pytest.mark.parametrize("overlay", INVENTORY_OVERLAYS)
def test_gpu_exporter_service_selects_no_inventory_pod(overlay: str) -> None:
    (service,) = objects(GPU_EXPORTER, "Service")
    selector = service["spec"]["selector"].items()
    selected = [
        workload["metadata"]["name"]
        for workload in objects(overlay, *WORKLOAD_KINDS)
        if selector <= workload["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert selected == []


def test_gpu_exporter_service_can_be_found_by_prometheus() -> None:
    (service,) = objects(GPU_EXPORTER, "Service")
    annotations = service["metadata"].get("annotations", {})
    scrape = {key: annotations.get(f"prometheus.io/{key}") for key in ("scrape", "port", "path")}
    assert (scrape, service["metadata"]["labels"]["app.kubernetes.io/name"]) == (
        {"scrape": "true", "port": str(GPU_EXPORTER_PORT), "path": "/metrics"},
        GPU_EXPORTER_APP,
    )


def test_gpu_exporter_cli_exists() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "exporter", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
    )
    assert (result.returncode, "--podresources-socket" in result.stdout) == (0, True), (
        result.stdout + result.stderr
    )


def test_gpu_exporter_env_names_only_real_settings() -> None:
    # Every variable the container sets, except the NVIDIA runtime's, is an
    # ExporterSettings setting; a typo would otherwise be ignored silently.
    runtime = {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}
    names = set(env_of(the_container(GPU_EXPORTER))) - runtime
    assert names - setting_names() == set()


def test_gpu_exporter_overlay_files_name_only_real_settings() -> None:
    # Comments included: the documented-but-unset settings must exist too.
    mentioned = {
        name
        for path in (OVERLAYS_DIR / GPU_EXPORTER).glob("*.yaml")
        for name in re.findall(r"\bGPU_EXPORTER_[A-Z0-9_]+", path.read_text())
    }
    assert {"GPU_EXPORTER_PROCESS_INFO", "GPU_EXPORTER_MAX_SERIES"} <= mentioned
    assert mentioned - setting_names() == set()


def test_gpu_exporter_env_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in setting_names():
        monkeypatch.delenv(name, raising=False)
    for name, entry in env_of(the_container(GPU_EXPORTER)).items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    monkeypatch.setenv("NODE_NAME", "gpu-node-1")
    settings = ExporterSettings()
    assert (
        settings.port,
        settings.interval,
        settings.host_proc,
        settings.podresources_socket,
        settings.k8s.value,
    ) == (
        GPU_EXPORTER_PORT,
        5.0,
        Path("/host/proc"),
        Path("/var/lib/kubelet/pod-resources/kubelet.sock"),
        "auto",
    )


def test_gpu_exporter_docker_fallback_is_optional_and_mounts_read_only(tmp_path: Path) -> None:
    overlay = OVERLAYS_DIR / GPU_EXPORTER
    (tmp_path / "docker-fallback.yaml").write_text((overlay / "docker-fallback.yaml").read_text())
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                # kustomize takes bases as relative paths only.
                "bases": [os.path.relpath(overlay, tmp_path)],
                "patchesStrategicMerge": ["docker-fallback.yaml"],
            }
        )
    )
    (daemonset,) = [obj for obj in kustomize(tmp_path) if obj["kind"] == "DaemonSet"]

    def docker_mounts(workload: Manifest) -> list[tuple[str, str, bool]]:
        spec = pod_spec(workload)
        host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        return [
            (host[m["name"]], m["mountPath"], m.get("readOnly", False))
            for m in spec["containers"][0]["volumeMounts"]
            if m["name"] in host and "docker" in host[m["name"]]
        ]

    # Not in the overlay itself; with the patch, mounted where the exporter looks
    # (GPU_EXPORTER_DOCKER_ROOT's default + /containers), next to the other mounts.
    docker_root = ExporterSettings.model_fields["docker_root"].default
    mount_paths = {m["mountPath"] for m in pod_spec(daemonset)["containers"][0]["volumeMounts"]}
    assert docker_mounts(the_daemonset(GPU_EXPORTER)) == []
    assert docker_mounts(daemonset) == [
        ("/var/lib/docker/containers", str(docker_root / "containers"), True)
    ]
    assert set(GPU_EXPORTER_HOST_PATHS.values()) <= mount_paths
