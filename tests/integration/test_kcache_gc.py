"""Garbage collection on a real store: crashes mid-remove, and mounts that outlive a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpufleet.kcache.cluster import CacheKey, PodInfo
from gpufleet.kcache.gc import NOT_WANTED, OVER_BUDGET, collect_garbage
from gpufleet.kcache.mounts import bind_read_only, mounted_at, read_mountinfo, unmount
from gpufleet.kcache.publications import PUBLICATIONS, Publication, PublicationLog
from gpufleet.kcache.store import CacheStore
from tests.polling import wait_until

pytestmark = pytest.mark.integration

A = "sha256:" + "aa" * 32
B = "sha256:" + "bb" * 32
C = "sha256:" + "cc" * 32
IMAGE_ROOT = "/cache"
POD = PodInfo("team-a", "app", "0b7e4d43-0000-4000-8000-000000000001", "default")
CACHE = CacheKey("GKMCache", "team-a", "vector-add-cache")


def fill_for(mount_root: str, size: int = 10_000) -> Callable[[Path], None]:
    def fill(tmp: Path) -> None:
        group = tmp / ("G" * 52)
        group.mkdir()
        (group / "k.cubin").write_bytes(os.urandom(size))
        children = {"k.cubin": f"{mount_root}/{'G' * 52}/k.cubin"}
        (group / "__grp__k.json").write_text(json.dumps({"child_paths": children}))

    return fill


def install(store: CacheStore, digest: str, mount_root: str, size: int = 10_000) -> Path:
    return store.install(digest, mount_root, fill_for(mount_root, size))


@pytest.fixture
def store(tmp_path: Path) -> CacheStore:
    return CacheStore(tmp_path / "store", durable=False)


def keys(store: CacheStore) -> list[tuple[str, str]]:
    return [(c.digest, c.mount_root) for c in store.caches()]


def test_a_collection_removes_unwanted_digests_at_every_root_and_keeps_wanted_ones(
    store: CacheStore,
) -> None:
    install(store, A, IMAGE_ROOT)
    store.derive(A, IMAGE_ROOT, "/kernels")
    install(store, B, IMAGE_ROOT)

    result = collect_garbage(store, wanted={B}, in_use=set(), max_bytes=None)

    assert [(c.digest, c.mount_root) for c in result.removed] == [
        (A, IMAGE_ROOT),
        (A, "/kernels"),
    ]
    assert set(result.plan.reasons.values()) == {NOT_WANTED}
    assert keys(store) == [(B, IMAGE_ROOT)]
    assert not store.path(A, IMAGE_ROOT).parent.exists()
    assert result.freed_bytes == sum(r.size_bytes for r in result.plan.removals) > 0


def test_the_least_recently_used_order_survives_a_restart(store: CacheStore) -> None:
    for digest in (A, B, C):
        install(store, digest, IMAGE_ROOT)
    size = store.entry_size(A, IMAGE_ROOT)
    store.touch(A, IMAGE_ROOT, when=3000.0)
    store.touch(B, IMAGE_ROOT, when=1000.0)
    store.touch(C, IMAGE_ROOT, when=2000.0)

    restarted = CacheStore(store.root, durable=False)
    result = collect_garbage(restarted, wanted={A, B, C}, in_use=set(), max_bytes=2 * size)

    assert [(c.digest, r) for c, r in result.plan.reasons.items()] == [(B, OVER_BUDGET)]
    assert keys(restarted) == [(A, IMAGE_ROOT), (C, IMAGE_ROOT)]


_KILLED_REMOVER = """
import sys, time
from pathlib import Path
from gpufleet.kcache.store import CacheStore
from tests.polling import wait_until

root, digest, mount_root, control = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])

def stop_half_way(self, name, target):
    # Called by remove once the marker is gone and flushed: delete one file, then wait for
    # the SIGKILL, as a process killed in the middle of its rmtree.
    sorted(p for p in target.rglob("*") if p.is_file())[0].unlink()
    (control / "removing").write_text("")
    while True:
        time.sleep(1)

CacheStore._clear_leftovers = stop_half_way
CacheStore(root).remove(digest, mount_root)
"""


def test_a_remove_killed_between_marker_and_directory_serves_nothing_and_is_cleared(
    store: CacheStore, tmp_path: Path
) -> None:
    path = install(store, A, IMAGE_ROOT)
    install(store, B, IMAGE_ROOT)
    control = tmp_path / "control"
    control.mkdir()
    remover = subprocess.Popen(
        [sys.executable, "-c", _KILLED_REMOVER, str(store.root), A, IMAGE_ROOT, str(control)]
    )
    try:

        def removing() -> bool:
            assert remover.poll() is None, "the remover died before it removed"
            return (control / "removing").exists()

        wait_until(removing, 60, "the remover getting to its rmtree")
    finally:
        remover.send_signal(signal.SIGKILL)
        remover.wait(timeout=60)
    assert path.is_dir()  # half removed: no marker, some files

    restarted = CacheStore(store.root, durable=False)
    assert restarted.installed(A, IMAGE_ROOT) is None
    assert keys(restarted) == [(B, IMAGE_ROOT)]
    result = collect_garbage(restarted, wanted={A, B}, in_use=set(), max_bytes=None)

    assert path in result.swept
    assert not path.exists()
    assert keys(restarted) == [(B, IMAGE_ROOT)]
    fill = fill_for(IMAGE_ROOT)
    calls: list[Path] = []

    def counted(tmp: Path) -> None:
        calls.append(tmp)
        fill(tmp)

    restarted.install(A, IMAGE_ROOT, counted)
    assert len(calls) == 1
    assert restarted.is_complete(A, IMAGE_ROOT)


_GC_AFTER_RESTART = """
import json, sys
from pathlib import Path
from gpufleet.kcache.gc import collect_garbage
from gpufleet.kcache.mounts import read_mountinfo
from gpufleet.kcache.publications import PUBLICATIONS, PublicationLog
from gpufleet.kcache.store import CacheStore
from tests.polling import wait_until

root = Path(sys.argv[1])
log = PublicationLog(root / PUBLICATIONS)
in_use = {(p.digest, p.mount_root) for p in log.live(read_mountinfo())}
result = collect_garbage(CacheStore(root), wanted=set(), in_use=in_use, max_bytes=0)
print(json.dumps({
    "in_use": sorted(in_use),
    "removed": [[c.digest, c.mount_root] for c in result.removed],
    "over_budget": result.plan.over_budget,
}))
"""


def gc_in_a_new_process(store: CacheStore) -> dict[str, object]:
    """A collection as a restarted node process runs it: usage from records and mountinfo."""
    done = subprocess.run(
        [sys.executable, "-c", _GC_AFTER_RESTART, str(store.root)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(done.stdout)
    return result


def published(digest: str, mount_root: str, source: Path, target: Path, vid: str) -> Publication:
    """The record the CSI plugin writes when it has bind-mounted `source` at `target`."""
    return Publication(
        volume_id="csi-" + vid * 32,
        target_path=target,
        cache=CACHE,
        pod=POD,
        digest=digest,
        mount_root=mount_root,
        source=source,
        created_target=False,
        published_at=1.0,
    )


@pytest.fixture
def pod_target(tmp_path: Path) -> Iterator[Path]:
    """A kubelet-style publish target; unmounted afterwards if a test left it mounted."""
    target = (
        tmp_path / "kubelet" / "pods" / POD.uid / "volumes" / "kubernetes.io~csi" / "k" / "mount"
    )
    target.mkdir(parents=True)
    yield target
    while mounted_at(target, read_mountinfo()) is not None:
        unmount(target)


def test_a_mounted_cache_is_not_collected_after_a_restart(
    store: CacheStore, pod_target: Path, tmp_path: Path
) -> None:
    pod_root = "/kernels"
    install(store, A, IMAGE_ROOT)
    source = store.derive(A, IMAGE_ROOT, pod_root)
    install(store, B, IMAGE_ROOT)
    bind_read_only(source, pod_target)
    log = PublicationLog(store.root / PUBLICATIONS)
    publication = published(A, pod_root, source, pod_target, "12")
    log.record(publication)
    # A stale record (a crash after its unmount) protects nothing.
    stale_target = tmp_path / "gone"
    stale_target.mkdir()
    log.record(published(B, IMAGE_ROOT, store.path(B, IMAGE_ROOT), stale_target, "34"))
    before = sorted(p.read_bytes() for p in pod_target.rglob("*") if p.is_file())

    first = gc_in_a_new_process(store)  # nothing wanted, a budget of 0: all but the mount go

    assert first == {
        "in_use": [[A, pod_root]],
        "removed": [[A, IMAGE_ROOT], [B, IMAGE_ROOT]],
        "over_budget": True,
    }
    assert keys(store) == [(A, pod_root)]
    assert sorted(p.read_bytes() for p in pod_target.rglob("*") if p.is_file()) == before

    unmount(pod_target)
    log.remove(publication.volume_id)
    second = gc_in_a_new_process(store)

    assert second["removed"] == [[A, pod_root]]
    assert keys(store) == []
