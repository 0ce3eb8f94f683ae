"""Layer (b) of pod attribution: the pod index, docker's labels, and the per-process cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpufleet.exporter.podmap.cgroup import CgroupRef
from gpufleet.exporter.podmap.procfs import ProcFs
from gpufleet.exporter.podmap.resolver import (
    DockerLabels,
    PodIndex,
    ProcessAttributor,
    bare_container_id,
    label_name,
)
from gpufleet.exporter.snapshot import Owner
from tests.doubles.hostproc import HostProc, containerd_cgroup_v2

UID = "11111111-2222-4333-8444-555555555555"
CID = "c" * 64


def pod(uid: str = UID, *, name: str = "train-0", container_id: str = CID) -> dict[str, Any]:
    return {
        "metadata": {"uid": uid, "namespace": "ml", "name": name, "labels": {"team": "a"}},
        "status": {
            "initContainerStatuses": [{"name": "init", "containerID": "cri-o://" + "e" * 64}],
            "containerStatuses": [{"name": "main", "containerID": "containerd://" + container_id}],
        },
    }


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_container_ids_lose_their_runtime_prefix() -> None:
    assert bare_container_id("containerd://abc") == "abc"
    assert bare_container_id("abc") == "abc"


def test_pod_labels_become_prometheus_label_names() -> None:
    assert label_name("app.kubernetes.io/name") == "label_app_kubernetes_io_name"


def test_the_pod_index_names_pod_and_container_from_the_cgroup_ids() -> None:
    index = PodIndex()
    index.upsert(pod())
    assert index.lookup(CgroupRef(UID, CID)) == Owner("ml", "train-0", "main")
    assert index.lookup(CgroupRef(UID, "e" * 64)) == Owner("ml", "train-0", "init")
    assert index.lookup(CgroupRef(UID, "f" * 64)) == Owner("ml", "train-0", "")
    assert index.lookup(CgroupRef("99999999-2222-4333-8444-555555555555", CID)) is None


def test_a_deleted_pod_is_forgotten_and_moves_the_generation() -> None:
    index = PodIndex()
    index.upsert(pod())
    generation = index.generation
    index.remove(pod())
    assert index.lookup(CgroupRef(UID, CID)) is None
    assert index.generation == generation + 1
    index.remove(pod())  # unknown: nothing changes
    assert index.generation == generation + 1


async def test_an_update_that_changes_the_uid_forgets_the_old_uid() -> None:
    index = PodIndex()
    other = "99999999-2222-4333-8444-555555555555"
    await index.on_add(pod())
    await index.on_update(pod(), pod(other))  # the same name, another pod
    assert index.lookup(CgroupRef(UID, CID)) is None
    assert index.lookup(CgroupRef(other, CID)) == Owner("ml", "train-0", "main")
    assert len(index) == 1


STATIC_UID = "5c1a9f1e0b7d4e3a9c2f8e6d4b2a1908"  # what the kubelet calls the static pod
MIRROR_UID = "77777777-2222-4333-8444-555555555555"  # the mirror pod's own UID in the API


def mirror_pod(static_uid: str = STATIC_UID) -> dict[str, Any]:
    mirror = pod(MIRROR_UID, name="gpu-probe-node-1")
    mirror["metadata"]["namespace"] = "kube-system"
    mirror["metadata"]["annotations"] = {
        "kubernetes.io/config.hash": static_uid,
        "kubernetes.io/config.mirror": static_uid,
        "kubernetes.io/config.source": "file",
    }
    return mirror


def test_a_static_pod_is_found_through_its_mirror_pod() -> None:
    index = PodIndex()
    index.upsert(mirror_pod())
    owner = Owner("kube-system", "gpu-probe-node-1", "main")
    assert index.lookup(CgroupRef(STATIC_UID, CID)) == owner
    assert index.lookup(CgroupRef(MIRROR_UID, CID)) == owner
    assert len(index) == 1


def test_a_deleted_or_changed_mirror_pod_no_longer_answers_for_the_old_static_uid() -> None:
    index = PodIndex()
    index.upsert(mirror_pod())
    changed = "0" * 32
    index.upsert(mirror_pod(changed))  # the manifest changed: a new static UID
    assert index.lookup(CgroupRef(STATIC_UID, CID)) is None
    assert index.lookup(CgroupRef(changed, CID)) is not None
    index.remove(mirror_pod(changed))
    assert index.lookup(CgroupRef(changed, CID)) is None


def test_only_the_mirror_annotation_makes_an_alias() -> None:
    # config.hash alone is on every static pod the kubelet knows, but only a
    # mirror pod (config.mirror) stands for one in the API.
    index = PodIndex()
    plain = pod()
    plain["metadata"]["annotations"] = {"kubernetes.io/config.hash": STATIC_UID}
    index.upsert(plain)
    assert index.lookup(CgroupRef(STATIC_UID, CID)) is None


def write_docker_config(root: Path, container_id: str, labels: dict[str, str] | str) -> None:
    directory = root / "containers" / container_id
    directory.mkdir(parents=True)
    body = labels if isinstance(labels, str) else json.dumps({"Config": {"Labels": labels}})
    (directory / "config.v2.json").write_text(body)


def test_docker_labels_name_the_owner_without_the_api(tmp_path: Path) -> None:
    write_docker_config(tmp_path, CID, {
        "io.kubernetes.pod.name": "train-0", "io.kubernetes.pod.namespace": "ml",
        "io.kubernetes.container.name": "main",
    })  # fmt: skip
    assert DockerLabels(tmp_path).lookup(CgroupRef(UID, CID)) == Owner("ml", "train-0", "main")


def test_docker_labels_give_nothing_for_broken_foreign_or_hostile_input(tmp_path: Path) -> None:
    write_docker_config(tmp_path, "a" * 64, "{not json")
    write_docker_config(tmp_path, "b" * 64, {"maintainer": "someone"})
    docker = DockerLabels(tmp_path)
    assert docker.lookup(CgroupRef(UID, "a" * 64)) is None
    assert docker.lookup(CgroupRef(UID, "b" * 64)) is None
    assert docker.lookup(CgroupRef(UID, "d" * 64)) is None  # no such container
    assert docker.lookup(CgroupRef(UID, "../../etc")) is None  # never a path outside root
    assert docker.lookup(CgroupRef(UID, None)) is None


def test_lookups_are_tried_in_order_until_one_names_the_owner(tmp_path: Path) -> None:
    proc = HostProc(tmp_path / "proc")
    proc.add(10, cgroup=containerd_cgroup_v2(UID, CID))
    write_docker_config(tmp_path / "docker", CID, {
        "io.kubernetes.pod.name": "from-docker", "io.kubernetes.pod.namespace": "ml",
    })  # fmt: skip
    index = PodIndex()  # the API is unreachable: the index stays empty
    attributor = ProcessAttributor(
        ProcFs(proc.root), [index.lookup, DockerLabels(tmp_path / "docker").lookup]
    )
    owner = attributor.attribute([10])[10].owner
    assert owner is not None
    assert owner.pod == "from-docker"


def test_a_negative_lookup_is_retried_after_the_ttl(tmp_path: Path) -> None:
    proc = HostProc(tmp_path / "proc")
    proc.add(10, cgroup=containerd_cgroup_v2(UID, CID))
    index, clock = PodIndex(), Clock()
    attributor = ProcessAttributor(ProcFs(proc.root), [index.lookup], clock=clock)
    assert attributor.attribute([10])[10].owner is None
    attributor.attribute([10])
    assert attributor.owner_lookups == 1  # cached negative
    clock.now = 6.0
    attributor.attribute([10])
    assert attributor.owner_lookups == 2
    assert attributor.proc_reads == 1  # /proc is not read again for it


def test_a_negative_lookup_is_retried_at_once_when_the_pod_index_changes(tmp_path: Path) -> None:
    proc = HostProc(tmp_path / "proc")
    proc.add(10, cgroup=containerd_cgroup_v2(UID, CID))
    index = PodIndex()
    attributor = ProcessAttributor(
        ProcFs(proc.root), [index.lookup], generation=lambda: index.generation, clock=Clock()
    )
    assert attributor.attribute([10])[10].owner is None
    index.upsert(pod())
    assert attributor.attribute([10])[10].owner == Owner("ml", "train-0", "main", ())


def test_a_resolved_owner_is_final_for_the_process_lifetime(tmp_path: Path) -> None:
    proc = HostProc(tmp_path / "proc")
    proc.add(10, cgroup=containerd_cgroup_v2(UID, CID))
    index, clock = PodIndex(), Clock()
    index.upsert(pod())
    attributor = ProcessAttributor(ProcFs(proc.root), [index.lookup], clock=clock)
    for step in range(5):
        clock.now = step * 100.0
        attributor.attribute([10])
    assert attributor.owner_lookups == 1


def test_a_host_process_is_never_looked_up(tmp_path: Path) -> None:
    proc = HostProc(tmp_path / "proc")
    proc.add(10)  # system.slice
    attributor = ProcessAttributor(ProcFs(proc.root), [PodIndex().lookup], clock=Clock())
    identity = attributor.attribute([10])[10]
    assert identity.owner is None
    assert identity.command == "python train.py"
    assert attributor.owner_lookups == 0


def test_a_vanished_process_gets_an_empty_identity(tmp_path: Path) -> None:
    attributor = ProcessAttributor(ProcFs(HostProc(tmp_path / "proc").root))
    identity = attributor.attribute([4242])[4242]
    assert (identity.username, identity.command, identity.owner) == ("", "", None)
