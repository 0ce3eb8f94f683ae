"""The CSI Node service over its real unix socket: publish, idempotency, every refusal, unpublish.

Real read-only bind mounts (the tests run as root), real publication records, the generated
client stubs, and requests shaped exactly as the kubelet sends them for an inline ephemeral
volume with podInfoOnMount (tests/kcache_csi_support.py).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gpufleet.kcache.cluster import CacheKey, PodInfo
from gpufleet.kcache.csi.v1 import csi_pb2
from gpufleet.kcache.errors import (
    CacheAccessDeniedError,
    CacheIncompatibleError,
    CacheNotFoundError,
    CacheNotReadyError,
    InvalidVolumeError,
    KcacheError,
    VolumeError,
)
from gpufleet.kcache.mounts import mounted_at, mounted_from, read_mountinfo
from tests.kcache_csi_support import (
    CACHE,
    DIGEST,
    MOUNT_ROOT,
    NAMESPACE,
    POD_NAME,
    POD_UID,
    FakeVolumeSource,
    Place,
    Plugin,
    kubelet_place,
    mount_tmpfs,
    publish_request,
    running_plugin,
    volume_context,
    volume_id,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root"),
]

SECRET = "s3cr3t-token-value"


@pytest.fixture
def place() -> Iterator[Place]:
    with kubelet_place(entry=True) as where:
        yield where


@pytest.fixture
async def plugin(place: Place) -> AsyncIterator[Plugin]:
    async with running_plugin(place, FakeVolumeSource(volume=place.volume())) as running:
        yield running


async def refused(call: object, request: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request)  # type: ignore[operator]
    return caught.value


def mounts_at(target: Path) -> int:
    return sum(1 for entry in read_mountinfo() if entry.mount_point == target)


def unpublish_request(
    target: Path, volume: str | None = None
) -> csi_pb2.NodeUnpublishVolumeRequest:
    return csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume if volume is not None else volume_id(), target_path=os.fspath(target)
    )


# --- publish ---------------------------------------------------------------------------------


async def test_publish_mounts_the_store_entry_read_only_although_readonly_is_false(
    plugin: Plugin,
) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target, readonly=False))
    assert (target / "triton" / "add.cubin").read_bytes() == b"cubin"
    with pytest.raises(OSError, match="Read-only file system") as write:
        (target / "triton" / "evil.cubin").write_bytes(b"x")
    assert write.value.errno == errno.EROFS
    entry = mounted_at(target, read_mountinfo())
    assert entry is not None
    assert entry.read_only
    assert not (plugin.place.entry / "triton" / "evil.cubin").exists()


async def test_publish_hands_the_node_state_the_checked_request(plugin: Plugin) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    (request,) = plugin.source.prepare_calls
    assert request.volume_id == volume_id()
    assert request.target_path == target
    assert request.volume_name == "kernels"
    assert request.cache == CacheKey("GKMCache", NAMESPACE, CACHE)
    assert request.pod == PodInfo(NAMESPACE, POD_NAME, POD_UID, "default")
    assert plugin.source.publish_calls == [(request, plugin.place.volume())]


async def test_publish_records_the_publication_durably(plugin: Plugin) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    record = plugin.log.get(volume_id())
    assert record is not None
    assert (record.target_path, record.source, record.digest, record.mount_root) == (
        target,
        plugin.place.entry,
        DIGEST,
        MOUNT_ROOT,
    )
    assert record.created_target
    assert plugin.log.live(read_mountinfo()) == [record]


async def test_a_cluster_cache_is_named_by_its_own_key(plugin: Plugin) -> None:
    context = volume_context(attributes={"csi.gkm.io/ClusterGKMCache": "shared-kernels"})
    await plugin.node.NodePublishVolume(publish_request(plugin.place.target(), context=context))
    assert plugin.source.prepare_calls[0].cache == CacheKey(
        "ClusterGKMCache", None, "shared-kernels"
    )


async def test_gkms_form_a_gkmcache_key_without_namespace_names_a_cluster_cache(
    plugin: Plugin,
) -> None:
    context = volume_context(attributes={"csi.gkm.io/GKMCache": "shared-kernels"})
    await plugin.node.NodePublishVolume(publish_request(plugin.place.target(), context=context))
    assert plugin.source.prepare_calls[0].cache == CacheKey(
        "ClusterGKMCache", None, "shared-kernels"
    )


async def test_publish_logs_one_line_with_pod_and_cache_and_never_the_secrets(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gpufleet.kcache"):
        await plugin.node.NodePublishVolume(
            publish_request(plugin.place.target(), secrets={"token": SECRET})
        )
    lines = [r for r in caplog.records if r.name == "gpufleet.kcache.csi.node"]
    assert [r.getMessage() for r in lines] == ["volume published"]
    assert lines[0].__dict__["pod"] == f"{NAMESPACE}/{POD_NAME}"
    assert lines[0].__dict__["cache"] == f"GKMCache {NAMESPACE}/{CACHE}"
    assert SECRET not in " ".join(str(r.__dict__) for r in caplog.records)


async def test_a_refusal_never_logs_the_secrets(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    context = volume_context(attributes={"csi.gkm.io/GKMCache": "../etc"})
    with caplog.at_level(logging.INFO, logger="gpufleet.kcache"):
        await refused(
            plugin.node.NodePublishVolume,
            publish_request(plugin.place.target(), context=context, secrets={"token": SECRET}),
        )
    assert [r.getMessage() for r in caplog.records] == ["volume publish refused"]
    assert SECRET not in " ".join(str(r.__dict__) for r in caplog.records)


# --- idempotency -----------------------------------------------------------------------------


async def test_publishing_the_same_volume_again_is_ok_and_mounts_once(plugin: Plugin) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    await plugin.node.NodePublishVolume(publish_request(target))
    await plugin.node.NodePublishVolume(publish_request(target, readonly=True))
    assert mounts_at(target) == 1
    assert len(plugin.source.prepare_calls) == 1
    assert len(plugin.source.publish_calls) == 1


async def test_the_same_publish_after_a_restart_is_ok_from_the_record(place: Place) -> None:
    target = place.target()
    async with running_plugin(place, FakeVolumeSource(volume=place.volume())) as first:
        await first.node.NodePublishVolume(publish_request(target))
    # The cache moved on meanwhile: the mounted volume keeps what it was published with.
    again = FakeVolumeSource(error=CacheNotReadyError("pulling sha256:new"))
    async with running_plugin(place, again) as second:
        await second.node.NodePublishVolume(publish_request(target))
    assert again.prepare_calls == []
    assert mounts_at(target) == 1


async def test_the_same_volume_for_another_cache_at_its_target_is_already_exists(
    plugin: Plugin,
) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    other = volume_context(
        attributes={"csi.gkm.io/GKMCache": "other-cache", "csi.gkm.io/namespace": NAMESPACE}
    )
    error = await refused(plugin.node.NodePublishVolume, publish_request(target, context=other))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert mounts_at(target) == 1


async def test_another_volume_at_a_published_target_is_already_exists(plugin: Plugin) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    error = await refused(
        plugin.node.NodePublishVolume, publish_request(target, volume="csi-" + "f" * 64)
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert volume_id() in (error.details() or "")
    assert mounts_at(target) == 1


async def test_the_same_volume_at_a_second_target_is_failed_precondition(plugin: Plugin) -> None:
    await plugin.node.NodePublishVolume(publish_request(plugin.place.target()))
    second = plugin.place.target(volume="second")
    error = await refused(plugin.node.NodePublishVolume, publish_request(second))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not second.exists()


async def test_a_target_mounted_from_something_else_is_already_exists(plugin: Plugin) -> None:
    target = plugin.place.target()
    target.mkdir()
    mount_tmpfs(target)
    error = await refused(plugin.node.NodePublishVolume, publish_request(target))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert mounts_at(target) == 1
    assert plugin.log.get(volume_id()) is None


async def test_a_mount_of_ours_whose_record_was_lost_is_recorded_again(plugin: Plugin) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    plugin.log.remove(volume_id())
    await plugin.node.NodePublishVolume(publish_request(target))
    assert mounts_at(target) == 1
    record = plugin.log.get(volume_id())
    assert record is not None
    assert mounted_from(target, record.source, read_mountinfo())


def unmount_by_hand(target: Path) -> None:
    subprocess.run(["umount", target], check=True)


def writable_bind(source: Path, target: Path) -> None:
    """A broken mount function: a bind mount that stays writable."""
    subprocess.run(["mount", "--bind", source, target], check=True)


def failing_bind(source: Path, target: Path) -> None:
    raise KcacheError(f"bind mount of {source} at {target}: Operation not permitted")


async def test_a_mount_that_is_not_read_only_is_undone_and_refused(place: Place) -> None:
    target = place.target()
    source = FakeVolumeSource(volume=place.volume())
    async with running_plugin(place, source, bind=writable_bind) as plugin:
        answer = await refused(plugin.node.NodePublishVolume, publish_request(target))
        assert answer.code() == grpc.StatusCode.INTERNAL
        assert "read-only" in (answer.details() or "")
        assert mounts_at(target) == 0
        assert not target.exists()
        assert plugin.log.all() == []
        assert source.publish_calls == []


async def test_a_failed_mount_is_internal_and_leaves_nothing(place: Place) -> None:
    target = place.target()
    async with running_plugin(
        place, FakeVolumeSource(volume=place.volume()), bind=failing_bind
    ) as plugin:
        answer = await refused(plugin.node.NodePublishVolume, publish_request(target))
        assert answer.code() == grpc.StatusCode.INTERNAL
        assert "Operation not permitted" in (answer.details() or "")
        assert not target.exists()
        assert plugin.log.all() == []


async def test_a_node_state_failing_to_note_a_publish_does_not_fail_the_pod(
    place: Place,
) -> None:
    class Forgetful(FakeVolumeSource):
        async def published(self, request: object, volume: object) -> None:  # type: ignore[override]
            raise RuntimeError("bug")

    target = place.target()
    async with running_plugin(place, Forgetful(volume=place.volume())) as plugin:
        await plugin.node.NodePublishVolume(publish_request(target))
    assert mounts_at(target) == 1


# --- the node state's refusals ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CacheNotReadyError("GKMCache team-a/vector-add-cache: pulling"), "UNAVAILABLE"),
        (
            CacheIncompatibleError(
                "no GPU of node-1 can use it: GPU 0 is cuda/80/32; cache has cuda/90/32"
            ),
            "FAILED_PRECONDITION",
        ),
        (CacheNotFoundError("GKMCache team-a/vector-add-cache does not exist"), "NOT_FOUND"),
        (CacheAccessDeniedError("team-a:default may not use it"), "PERMISSION_DENIED"),
        (InvalidVolumeError("containers mount it at /a and /b"), "INVALID_ARGUMENT"),
    ],
    ids=["not-ready", "incompatible", "not-found", "denied", "invalid"],
)
async def test_each_volume_error_is_its_status_code_with_its_message_and_mounts_nothing(
    place: Place, error: VolumeError, code: str
) -> None:
    target = place.target()
    async with running_plugin(place, FakeVolumeSource(error=error)) as plugin:
        answer = await refused(plugin.node.NodePublishVolume, publish_request(target))
        assert answer.code() == getattr(grpc.StatusCode, code)
        assert answer.details() == str(error)
        assert not target.exists()
        assert plugin.log.all() == []
        assert plugin.source.publish_calls == []


async def test_still_pulling_is_logged_at_info_and_other_refusals_at_warning(
    place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    levels = []
    for error in (CacheNotReadyError("pulling"), CacheNotFoundError("no such cache")):
        caplog.clear()
        async with running_plugin(place, FakeVolumeSource(error=error)) as plugin:
            with caplog.at_level(logging.INFO, logger="gpufleet.kcache"):
                await refused(plugin.node.NodePublishVolume, publish_request(place.target()))
        levels.append([(r.getMessage(), r.levelno) for r in caplog.records])
    assert levels == [
        [("volume publish refused", logging.INFO)],
        [("volume publish refused", logging.WARNING)],
    ]


async def test_an_incompatible_node_says_which_gpu_mismatches(place: Place) -> None:
    reason = "GPU 0 (NVIDIA A100-SXM4-80GB) is cuda/80/32; cache has cuda/90/32"
    source = FakeVolumeSource(error=CacheIncompatibleError(reason))
    async with running_plugin(place, source) as plugin:
        answer = await refused(plugin.node.NodePublishVolume, publish_request(place.target()))
    assert answer.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cuda/80/32" in (answer.details() or "")


async def test_a_crashing_node_state_is_internal_logged_once_and_mounts_nothing(
    place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(FakeVolumeSource):
        async def prepare(self, request: object) -> object:  # type: ignore[override]
            raise RuntimeError("bug")

    async with running_plugin(place, Broken()) as plugin:
        with caplog.at_level(logging.INFO, logger="gpufleet.kcache"):
            answer = await refused(plugin.node.NodePublishVolume, publish_request(place.target()))
    assert answer.code() == grpc.StatusCode.INTERNAL
    assert not place.target().exists()
    (line,) = caplog.records
    assert (line.getMessage(), line.levelno, line.__dict__["code"]) == (
        "volume publish refused",
        logging.ERROR,
        "INTERNAL",
    )
    assert line.exc_info is not None  # a bug of the node state: its traceback, once


# --- the plugin's own refusals ---------------------------------------------------------------


INVALID_CONTEXTS = {
    "not-ephemeral": {"csi.storage.k8s.io/ephemeral": None},
    "ephemeral-false": {"csi.storage.k8s.io/ephemeral": "false"},
    "no-pod-uid": {"csi.storage.k8s.io/pod.uid": None},
    "no-pod-namespace": {"csi.storage.k8s.io/pod.namespace": None},
    "no-pod-name": {"csi.storage.k8s.io/pod.name": None},
    "no-service-account": {"csi.storage.k8s.io/serviceAccount.name": None},
    "no-cache": {"csi.gkm.io/GKMCache": None},
    "both-caches": {"csi.gkm.io/ClusterGKMCache": "shared"},
    "cache-dotdot": {"csi.gkm.io/GKMCache": ".."},
    "cache-dotdot-inside": {"csi.gkm.io/GKMCache": "a..b"},
    "cache-slash": {"csi.gkm.io/GKMCache": "team-b/cache"},
    "cache-upper": {"csi.gkm.io/GKMCache": "Cache"},
    "cache-empty": {"csi.gkm.io/GKMCache": ""},
    "cache-too-long": {"csi.gkm.io/GKMCache": "a" * 254},
    "namespace-slash": {"csi.gkm.io/namespace": "team-a/../x"},
    "namespace-empty": {"csi.gkm.io/namespace": ""},
    "unknown-attribute": {"csi.gkm.io/Namespace": NAMESPACE},
    "pod-namespace-dotdot": {
        "csi.storage.k8s.io/pod.namespace": "..",
        "csi.gkm.io/namespace": "..",
    },
}


@pytest.mark.parametrize("changes", INVALID_CONTEXTS.values(), ids=INVALID_CONTEXTS.keys())
async def test_a_hostile_or_incomplete_volume_context_is_invalid_argument(
    plugin: Plugin, changes: dict[str, str | None]
) -> None:
    context = volume_context()
    for key, value in changes.items():
        if value is None:
            context.pop(key)
        else:
            context[key] = value
    target = plugin.place.target()
    answer = await refused(plugin.node.NodePublishVolume, publish_request(target, context=context))
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert plugin.source.prepare_calls == []
    assert not target.exists()


async def test_a_cluster_cache_with_a_namespace_is_invalid_argument(plugin: Plugin) -> None:
    context = volume_context(
        attributes={"csi.gkm.io/ClusterGKMCache": "shared", "csi.gkm.io/namespace": NAMESPACE}
    )
    answer = await refused(
        plugin.node.NodePublishVolume, publish_request(plugin.place.target(), context=context)
    )
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("missing", ["volume_id", "target_path", "volume_capability"])
async def test_a_missing_required_field_is_invalid_argument(plugin: Plugin, missing: str) -> None:
    request = publish_request(plugin.place.target())
    request.ClearField(missing)
    answer = await refused(plugin.node.NodePublishVolume, request)
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert missing in (answer.details() or "")
    assert plugin.source.prepare_calls == []


async def test_a_block_volume_is_invalid_argument(plugin: Plugin) -> None:
    request = publish_request(plugin.place.target())
    request.volume_capability.block.SetInParent()
    answer = await refused(plugin.node.NodePublishVolume, request)
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "block" in (answer.details() or "")


def _target_cases(place: Place) -> dict[str, str]:
    good = os.fspath(place.target())
    pods = place.kubelet / "pods"
    csi = f"{pods}/{POD_UID}/volumes/kubernetes.io~csi"
    return {
        "outside-kubelet": "/etc/cron.d/mount",
        "kubelet-prefix-lookalike": f"{place.kubelet}x{good.removeprefix(str(place.kubelet))}",
        "dotdot": f"{csi}/kernels/../../../../../../etc",
        "dotdot-back-in": f"{csi}/../kubernetes.io~csi/kernels/mount",
        "double-slash": good.replace("/volumes/", "//volumes/"),
        "trailing-slash": good + "/",
        "relative": good.lstrip("/"),
        "other-pod": f"{pods}/11111111-2222-3333-4444-555555555555/volumes/kubernetes.io~csi"
        "/kernels/mount",
        "not-csi-dir": f"{pods}/{POD_UID}/volumes/kubernetes.io~empty-dir/kernels/mount",
        "not-mount": f"{pods}/{POD_UID}/volumes/kubernetes.io~csi/kernels/other",
        "too-deep": f"{good}/deeper",
        "volume-name-upper": f"{pods}/{POD_UID}/volumes/kubernetes.io~csi/Kernels/mount",
        "pods-dir-itself": os.fspath(pods),
        "nul": good + "\0x",
    }


@pytest.mark.parametrize(
    "case",
    [
        "outside-kubelet",
        "kubelet-prefix-lookalike",
        "dotdot",
        "dotdot-back-in",
        "double-slash",
        "trailing-slash",
        "relative",
        "other-pod",
        "not-csi-dir",
        "not-mount",
        "too-deep",
        "volume-name-upper",
        "pods-dir-itself",
        "nul",
    ],
)
async def test_a_target_outside_the_pods_csi_volume_dir_is_invalid_argument(
    plugin: Plugin, case: str
) -> None:
    plugin.place.target()
    request = publish_request(plugin.place.target())
    request.target_path = _target_cases(plugin.place)[case]
    answer = await refused(plugin.node.NodePublishVolume, request)
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert plugin.source.prepare_calls == []
    assert plugin.log.all() == []


async def test_a_symlink_in_the_pod_directory_is_not_followed(plugin: Plugin) -> None:
    elsewhere = plugin.place.root / "elsewhere"
    (elsewhere / "kubernetes.io~csi" / "kernels").mkdir(parents=True)
    pod = plugin.place.kubelet / "pods" / POD_UID
    pod.mkdir(parents=True)
    (pod / "volumes").symlink_to(elsewhere)
    target = pod / "volumes" / "kubernetes.io~csi" / "kernels" / "mount"
    answer = await refused(plugin.node.NodePublishVolume, publish_request(target))
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "symlink" in (answer.details() or "")
    assert not (elsewhere / "kubernetes.io~csi" / "kernels" / "mount").exists()


async def test_a_symlink_as_the_target_is_not_followed(plugin: Plugin) -> None:
    target = plugin.place.target()
    (plugin.place.root / "elsewhere").mkdir()
    target.symlink_to(plugin.place.root / "elsewhere")
    answer = await refused(plugin.node.NodePublishVolume, publish_request(target))
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mounted_at(plugin.place.root / "elsewhere", read_mountinfo()) is None


async def test_a_missing_parent_directory_is_invalid_argument(plugin: Plugin) -> None:
    target = plugin.place.target(make_parent=False)
    answer = await refused(plugin.node.NodePublishVolume, publish_request(target))
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not target.parent.exists()


async def test_a_pod_naming_another_namespaces_cache_is_permission_denied(
    plugin: Plugin,
) -> None:
    context = volume_context(
        attributes={"csi.gkm.io/GKMCache": CACHE, "csi.gkm.io/namespace": "team-b"}
    )
    answer = await refused(
        plugin.node.NodePublishVolume, publish_request(plugin.place.target(), context=context)
    )
    assert answer.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "team-b" in (answer.details() or "")
    assert plugin.source.prepare_calls == []


# --- unpublish -------------------------------------------------------------------------------


async def test_unpublish_unmounts_removes_the_target_it_made_and_the_record(
    plugin: Plugin,
) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert mounts_at(target) == 0
    assert not target.exists()
    assert target.parent.is_dir()
    assert plugin.log.get(volume_id()) is None
    assert plugin.source.unpublish_calls == [volume_id()]
    assert (plugin.place.entry / "triton" / "add.cubin").read_bytes() == b"cubin"


async def test_unpublish_keeps_a_target_directory_it_did_not_make(plugin: Plugin) -> None:
    target = plugin.place.target()
    target.mkdir()
    await plugin.node.NodePublishVolume(publish_request(target))
    record = plugin.log.get(volume_id())
    assert record is not None
    assert not record.created_target
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert target.is_dir()
    assert mounts_at(target) == 0


async def test_unpublish_of_an_unknown_volume_is_ok_and_removes_an_empty_target(
    plugin: Plugin,
) -> None:
    target = plugin.place.target()
    target.mkdir()
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert not target.exists()
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert plugin.source.unpublish_calls == []


async def test_unpublish_twice_is_ok(plugin: Plugin) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert plugin.source.unpublish_calls == [volume_id()]


async def test_unpublish_never_unmounts_what_it_did_not_mount(plugin: Plugin) -> None:
    target = plugin.place.target()
    target.mkdir()
    mount_tmpfs(target)
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert mounts_at(target) == 1


async def test_unpublish_with_another_volumes_id_leaves_the_mount(plugin: Plugin) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    await plugin.node.NodeUnpublishVolume(unpublish_request(target, volume="csi-" + "e" * 64))
    assert mounts_at(target) == 1
    assert plugin.log.get(volume_id()) is not None


@pytest.mark.parametrize("missing", ["volume_id", "target_path"])
async def test_unpublish_without_a_required_field_is_invalid_argument(
    plugin: Plugin, missing: str
) -> None:
    request = unpublish_request(plugin.place.target())
    request.ClearField(missing)
    answer = await refused(plugin.node.NodeUnpublishVolume, request)
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unpublish_outside_the_pods_dir_is_invalid_argument_and_unmounts_nothing(
    plugin: Plugin,
) -> None:
    outside = plugin.place.root / "outside"
    outside.mkdir()
    mount_tmpfs(outside)
    answer = await refused(plugin.node.NodeUnpublishVolume, unpublish_request(outside))
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mounts_at(outside) == 1


async def test_unpublish_logs_one_line_with_pod_and_cache(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    with caplog.at_level(logging.INFO, logger="gpufleet.kcache"):
        await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert [r.getMessage() for r in caplog.records] == ["volume unpublished"]
    assert caplog.records[0].__dict__["pod"] == f"{NAMESPACE}/{POD_NAME}"
    assert caplog.records[0].__dict__["cache"] == f"GKMCache {NAMESPACE}/{CACHE}"


async def test_unpublish_retried_after_the_kubelet_removed_the_volume_dir_is_ok(
    plugin: Plugin,
) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    shutil.rmtree(target.parent)
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert plugin.source.unpublish_calls == [volume_id()]


async def test_unpublish_of_a_mount_gone_since_drops_the_record(plugin: Plugin) -> None:
    target = plugin.place.target()
    await plugin.node.NodePublishVolume(publish_request(target))
    unmount_by_hand(target)  # a reboot, or an admin
    shutil.rmtree(target.parent)
    await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert plugin.log.all() == []
    assert plugin.source.unpublish_calls == [volume_id()]


async def test_publish_unpublish_publish_again_works(plugin: Plugin) -> None:
    target = plugin.place.target()
    for _ in range(2):
        await plugin.node.NodePublishVolume(publish_request(target))
        await plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert mounts_at(target) == 0
    assert len(plugin.source.publish_calls) == 2
