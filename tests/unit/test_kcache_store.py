"""The content-addressed store: atomic installs, at most one fill per digest, crash recovery."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpufleet.kcache.errors import KcacheError
from gpufleet.kcache.store import CacheStore, StoredCache
from tests.polling import wait_until

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
ROOT = "/var/cache/gpufleet/kernels"
ROOT_KEY = hashlib.sha256(ROOT.encode()).hexdigest()


class Filler:
    """A fill that writes one file and counts its calls."""

    def __init__(self, content: str = "kernels", delay: float = 0.0) -> None:
        self.content = content
        self.delay = delay
        self.calls = 0
        self.seen: list[Path] = []

    def __call__(self, tmp: Path) -> None:
        self.calls += 1
        self.seen.append(tmp)
        time.sleep(self.delay)
        (tmp / "group").mkdir()
        (tmp / "group" / "k.cubin").write_text(self.content)


@pytest.fixture
def store(tmp_path: Path) -> CacheStore:
    return CacheStore(tmp_path / "store")


@contextlib.contextmanager
def holding_lock(store: CacheStore, name: str) -> Iterator[None]:
    """Hold the installer's lock of `name` (``<hex>-<mount key>``), as a live installer does."""
    (store.root / "locks").mkdir(parents=True, exist_ok=True)
    fd = os.open(store.root / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_the_path_of_a_cache_is_caches_sha256_hex_then_the_mount_roots_key(
    store: CacheStore,
) -> None:
    assert store.path(DIGEST, ROOT) == store.root / "caches" / "sha256" / ("ab" * 32) / ROOT_KEY


def test_one_digest_for_two_mount_roots_is_two_caches(store: CacheStore) -> None:
    first, second = Filler("for a"), Filler("for b")

    a = store.install(DIGEST, "/mnt/a", first)
    b = store.install(DIGEST, "/mnt/b", second)

    assert a != b
    assert (first.calls, second.calls) == (1, 1)
    assert store.installed(DIGEST, "/mnt/a") == a
    assert store.installed(DIGEST, "/mnt/b") == b
    assert (b / "group" / "k.cubin").read_text() == "for b"
    assert store.installed(DIGEST, "/mnt/c") is None


def test_the_store_lists_its_caches_with_their_digest_and_mount_root(store: CacheStore) -> None:
    store.install(DIGEST, "/mnt/b", Filler())
    store.install(DIGEST, "/mnt/a", Filler())
    store.install(OTHER, "/mnt/a", Filler())
    with pytest.raises(RuntimeError):
        store.install(OTHER, "/mnt/b", fail)

    assert [(c.digest, c.mount_root, c.path) for c in store.caches()] == [
        (DIGEST, "/mnt/a", store.path(DIGEST, "/mnt/a")),
        (DIGEST, "/mnt/b", store.path(DIGEST, "/mnt/b")),
        (OTHER, "/mnt/a", store.path(OTHER, "/mnt/a")),
    ]


def test_the_marker_records_the_digest_and_the_mount_root(store: CacheStore) -> None:
    path = store.install(DIGEST, ROOT, Filler())

    marker = path.with_name(path.name + ".complete")
    record = json.loads(marker.read_text())
    assert record == {"digest": DIGEST, "mount_root": ROOT, "size_bytes": record["size_bytes"]}
    assert record["size_bytes"] > 0
    assert "complete" not in {p.name for p in path.iterdir()}


@pytest.mark.parametrize("mount_root", ["relative/path", "/a/../b", "//a", "/a/", ""])
def test_a_mount_root_that_is_not_absolute_and_normalized_is_refused(
    store: CacheStore, mount_root: str
) -> None:
    with pytest.raises(KcacheError, match="mount root"):
        store.install(DIGEST, mount_root, Filler())


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "AB" * 32,
        "sha256:" + "ab" * 31,
        "sha256:" + "ab" * 32 + "\n",
        "sha512:" + "ab" * 64,
        "ab" * 32,
        "sha256:../../../etc",
        "sha256:" + "ab" * 31 + "/.",
    ],
)
def test_anything_but_a_sha256_digest_is_refused(store: CacheStore, digest: str) -> None:
    with pytest.raises(KcacheError, match="not a sha256 digest"):
        store.path(digest, ROOT)
    with pytest.raises(KcacheError, match="not a sha256 digest"):
        store.install(digest, ROOT, Filler())


def test_install_fills_once_and_a_second_install_does_nothing(store: CacheStore) -> None:
    fill = Filler()

    first = store.install(DIGEST, ROOT, fill)
    second = store.install(DIGEST, ROOT, fill)

    assert first == second == store.path(DIGEST, ROOT)
    assert fill.calls == 1
    assert (first / "group" / "k.cubin").read_text() == "kernels"
    assert store.is_complete(DIGEST, ROOT)


def test_fill_works_in_a_temporary_directory_on_the_stores_filesystem(store: CacheStore) -> None:
    fill = Filler()
    store.install(DIGEST, ROOT, fill)

    (tmp,) = fill.seen
    assert tmp.parent == store.root / "tmp"
    assert not tmp.exists()
    assert os.listdir(store.root / "tmp") == []


def test_the_cache_is_not_complete_while_it_is_being_filled(store: CacheStore) -> None:
    seen: list[bool] = []

    def fill(tmp: Path) -> None:
        seen.append(store.is_complete(DIGEST, ROOT))
        (tmp / "f").write_text("x")

    store.install(DIGEST, ROOT, fill)

    assert seen == [False]
    assert store.is_complete(DIGEST, ROOT)


def test_an_installed_cache_is_readable_by_other_users(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        path = CacheStore(tmp_path / "store").install(DIGEST, ROOT, Filler())
    finally:
        os.umask(old)

    assert path.stat().st_mode & 0o777 == 0o755


def test_a_failed_fill_leaves_no_trace(store: CacheStore) -> None:
    def fill(tmp: Path) -> None:
        (tmp / "half").write_text("written")
        raise RuntimeError("layer refused")

    with pytest.raises(RuntimeError, match="layer refused"):
        store.install(DIGEST, ROOT, fill)

    assert not store.path(DIGEST, ROOT).exists()
    assert not store.is_complete(DIGEST, ROOT)
    assert os.listdir(store.root / "tmp") == []
    assert not (store.root / "caches").exists()


def fail(tmp: Path) -> None:
    raise RuntimeError("boom")


def test_a_failed_fill_is_retried_by_the_next_install(store: CacheStore) -> None:
    with pytest.raises(RuntimeError):
        store.install(DIGEST, ROOT, fail)

    fill = Filler()
    store.install(DIGEST, ROOT, fill)

    assert fill.calls == 1
    assert store.is_complete(DIGEST, ROOT)


def test_a_crash_leftover_without_its_marker_is_removed_and_redone(store: CacheStore) -> None:
    leftover = store.path(DIGEST, ROOT)
    leftover.mkdir(parents=True)
    (leftover / "truncated.cubin").write_text("half")
    stale_tmp = store.root / "tmp" / f"{'ab' * 32}-{ROOT_KEY}.crashed"
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "x").write_text("half")
    other_tmp = store.root / "tmp" / f"{'cd' * 32}-{ROOT_KEY}.busy"
    other_tmp.mkdir()
    assert not store.is_complete(DIGEST, ROOT)

    fill = Filler()
    with holding_lock(store, f"{'cd' * 32}-{ROOT_KEY}"):
        path = store.install(DIGEST, ROOT, fill)

    assert fill.calls == 1
    assert sorted(p.name for p in path.rglob("*")) == ["group", "k.cubin"]
    assert not stale_tmp.exists()
    assert other_tmp.exists()  # another digest's installer may be at work


def test_a_marker_alone_is_not_a_complete_cache(store: CacheStore) -> None:
    store.install(DIGEST, ROOT, Filler())
    shutil.rmtree(store.path(DIGEST, ROOT))

    assert not store.is_complete(DIGEST, ROOT)
    fill = Filler()
    store.install(DIGEST, ROOT, fill)
    assert fill.calls == 1


def test_two_threads_installing_one_digest_fill_once(store: CacheStore) -> None:
    fill = Filler(delay=0.3)
    results: list[Path] = []
    errors: list[BaseException] = []

    def install() -> None:
        try:
            results.append(store.install(DIGEST, ROOT, fill))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert errors == []
    assert results == [store.path(DIGEST, ROOT)] * 2
    assert fill.calls == 1


def test_installers_of_different_digests_do_not_wait_for_each_other(store: CacheStore) -> None:
    started = threading.Event()
    release = threading.Event()

    def slow(tmp: Path) -> None:
        started.set()
        release.wait(timeout=10)
        (tmp / "a").write_text("a")

    thread = threading.Thread(target=store.install, args=(DIGEST, ROOT, slow))
    thread.start()
    try:
        assert started.wait(timeout=10)
        other = store.install(OTHER, ROOT, Filler())  # would block here if the lock were global
        assert store.is_complete(OTHER, ROOT)
        assert not store.is_complete(DIGEST, ROOT)
    finally:
        release.set()
        thread.join(timeout=10)
    assert other == store.path(OTHER, ROOT)
    assert store.is_complete(DIGEST, ROOT)


def test_a_volatile_store_installs_the_same_way(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "store", durable=False)
    fill = Filler()

    assert store.install(DIGEST, ROOT, fill) == store.path(DIGEST, ROOT)
    assert store.install(DIGEST, ROOT, fill) == store.path(DIGEST, ROOT)
    assert fill.calls == 1


_INSTALLER = """
import sys, time
from pathlib import Path
from gpufleet.kcache.store import CacheStore, StoredCache

root, digest, control, mount = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]

def fill(tmp: Path) -> None:
    (tmp / "half.cubin").write_text("half")
    (control / "filling").write_text(str(tmp))
    while not (control / "go").exists():  # hold the lock until told, or until killed
        time.sleep(0.01)
    (tmp / "k.cubin").write_text("kernels")

CacheStore(root).install(digest, mount, fill)
"""


def start_installer(
    store: CacheStore, digest: str, control: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """An installer in another process, stopped mid-fill; returns it and its temp directory."""
    control.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", _INSTALLER, str(store.root), digest, str(control), ROOT]
    )
    filling = control / "filling"
    wait_until(lambda: filling.exists() or process.poll() is not None, 60, "the installer's fill")
    assert filling.exists(), "the installer died before it filled"
    return process, Path((control / "filling").read_text())


THIRD = "sha256:" + "ef" * 32


def test_a_sigkilled_installers_temp_dir_is_swept_at_start_up_and_a_live_ones_is_kept(
    store: CacheStore, tmp_path: Path
) -> None:
    # The live one first: every installer sweeps as it starts, and keeps what is locked.
    live, busy = start_installer(store, OTHER, tmp_path / "live")
    killed, stale = start_installer(store, DIGEST, tmp_path / "killed")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    try:
        assert stale.is_dir()
        assert busy.is_dir()

        # A new process's store, installing a third digest: neither of the other two.
        CacheStore(store.root).install(THIRD, ROOT, Filler())

        assert not stale.exists()
        assert busy.is_dir()
        (tmp_path / "live" / "go").write_text("")
        assert live.wait(timeout=60) == 0
    finally:
        live.kill()
    assert sorted(p.name for p in store.path(OTHER, ROOT).iterdir()) == ["half.cubin", "k.cubin"]
    assert not store.is_complete(DIGEST, ROOT)


def test_sweep_keeps_what_is_not_an_installers_temp_dir(store: CacheStore) -> None:
    foreign = store.root / "tmp" / "not-ours"
    foreign.mkdir(parents=True)
    stale = store.root / "tmp" / f"{'ab' * 32}-{ROOT_KEY}.dead"
    stale.mkdir()

    assert store.sweep() == [stale]
    assert foreign.is_dir()


# -- derive: the same cache for another mount root, without the network -------------------------

GROUP_A = "A" * 52
GROUP_B = "B" * 52


def group_file(mount_root: str, group: str, *names: str) -> str:
    """A ``__grp__`` file as extraction writes it for `mount_root` (sorted, compact)."""
    children = {n: f"{mount_root}/{group}/{n}" for n in sorted(names)}
    return json.dumps({"child_paths": children}, sort_keys=True, separators=(",", ":"))


def triton_like(mount_root: str) -> Callable[[Path], None]:
    """A fill writing two kernel groups (one nested) whose group files name `mount_root`."""

    def fill(tmp: Path) -> None:
        a = tmp / GROUP_A
        a.mkdir()
        (a / "k.json").write_text('{"name": "k"}')
        (a / "k.cubin").write_bytes(b"\x7fELF cubin")
        (a / "__grp__k.json").write_text(group_file(mount_root, GROUP_A, "k.json", "k.cubin"))
        b = tmp / "nested" / "triton_cache" / GROUP_B
        b.mkdir(parents=True)
        (b / "j.json").write_text('{"name": "j"}')
        (b / "__grp__j.json").write_text(
            group_file(mount_root, f"nested/triton_cache/{GROUP_B}", "j.json")
        )
        (tmp / "nested" / "other.bin").write_bytes(b"\0" * 5000)

    return fill


def tree(path: Path) -> dict[str, bytes]:
    """Every regular file below `path` (relative name -> bytes)."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_derive_copies_the_entry_and_rewrites_every_group_file_to_the_new_root(
    store: CacheStore,
) -> None:
    source = store.install(DIGEST, "/cache", triton_like("/cache"))
    before = tree(source)

    derived = store.derive(DIGEST, "/cache", "/kernels")

    assert derived == store.path(DIGEST, "/kernels")
    assert store.installed(DIGEST, "/kernels") == derived
    got = tree(derived)
    assert set(got) == set(before)
    grp_a = f"{GROUP_A}/__grp__k.json"
    grp_b = f"nested/triton_cache/{GROUP_B}/__grp__j.json"
    assert json.loads(got[grp_a]) == {
        "child_paths": {
            "k.cubin": f"/kernels/{GROUP_A}/k.cubin",
            "k.json": f"/kernels/{GROUP_A}/k.json",
        }
    }
    assert json.loads(got[grp_b]) == {
        "child_paths": {"j.json": f"/kernels/nested/triton_cache/{GROUP_B}/j.json"}
    }
    assert {k: v for k, v in got.items() if k not in (grp_a, grp_b)} == {
        k: v for k, v in before.items() if k not in (grp_a, grp_b)
    }
    assert tree(source) == before  # the source entry is left as it was


def test_a_derived_entry_is_what_extracting_for_that_root_gives(store: CacheStore) -> None:
    store.install(DIGEST, "/cache", triton_like("/cache"))
    direct = store.install(OTHER, "/srv/k", triton_like("/srv/k"))

    derived = store.derive(DIGEST, "/cache", "/srv/k")

    assert tree(derived) == tree(direct)


def test_a_derived_entry_has_the_modes_pods_need(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        store = CacheStore(tmp_path / "store")
        store.install(DIGEST, "/cache", triton_like("/cache"))
        derived = store.derive(DIGEST, "/cache", "/kernels")
    finally:
        os.umask(old)

    modes = {p.stat().st_mode & 0o7777 for p in derived.rglob("*") if p.is_file()}
    dirs = {p.stat().st_mode & 0o7777 for p in [derived, *derived.rglob("*")] if p.is_dir()}
    assert (modes, dirs) == ({0o644}, {0o755})


def test_derive_refuses_when_the_source_root_is_not_installed(store: CacheStore) -> None:
    store.install(DIGEST, "/other", triton_like("/other"))

    with pytest.raises(KcacheError, match=r"'/cache'.*not installed"):
        store.derive(DIGEST, "/cache", "/kernels")

    assert not store.path(DIGEST, "/kernels").exists()


def test_derive_refuses_a_source_left_half_removed(store: CacheStore) -> None:
    source = store.install(DIGEST, "/cache", triton_like("/cache"))
    source.with_name(source.name + ".complete").unlink()  # a crash mid-remove

    with pytest.raises(KcacheError, match="not installed"):
        store.derive(DIGEST, "/cache", "/kernels")


def test_derive_to_an_installed_root_does_nothing(store: CacheStore) -> None:
    store.install(DIGEST, "/cache", triton_like("/cache"))
    first = store.derive(DIGEST, "/cache", "/kernels")
    inode = (first / "nested" / "other.bin").stat().st_ino

    assert store.derive(DIGEST, "/cache", "/kernels") == first
    assert (first / "nested" / "other.bin").stat().st_ino == inode


def test_derive_to_the_same_root_returns_the_source(store: CacheStore) -> None:
    source = store.install(DIGEST, "/cache", triton_like("/cache"))

    assert store.derive(DIGEST, "/cache", "/cache") == source


@pytest.mark.parametrize("bad", ["kernels", "/a/../b", "/kernels/"])
def test_derive_refuses_a_malformed_mount_root(store: CacheStore, bad: str) -> None:
    store.install(DIGEST, "/cache", triton_like("/cache"))

    with pytest.raises(KcacheError, match="mount root"):
        store.derive(DIGEST, "/cache", bad)


def test_derive_refuses_a_source_holding_a_symbolic_link(store: CacheStore) -> None:
    source = store.install(DIGEST, "/cache", triton_like("/cache"))
    (source / GROUP_A / "link").symlink_to("/etc/passwd")

    with pytest.raises(KcacheError, match=r"link.*not a regular file"):
        store.derive(DIGEST, "/cache", "/kernels")

    assert not store.is_complete(DIGEST, "/kernels")
    assert os.listdir(store.root / "tmp") == []


def test_derive_refuses_a_group_file_that_is_not_one(store: CacheStore) -> None:
    source = store.install(DIGEST, "/cache", triton_like("/cache"))
    (source / GROUP_A / "__grp__k.json").write_text('{"child_paths": {"k.json": "/etc/k.json"}}')

    with pytest.raises(KcacheError, match=r"__grp__k\.json"):
        store.derive(DIGEST, "/cache", "/kernels")

    assert not store.is_complete(DIGEST, "/kernels")


def test_two_threads_deriving_one_root_copy_once(store: CacheStore) -> None:
    store.install(DIGEST, "/cache", triton_like("/cache"))
    results: list[Path] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def derive() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(store.derive(DIGEST, "/cache", "/kernels"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=derive) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert results == [store.path(DIGEST, "/kernels")] * 4
    assert os.listdir(store.root / "tmp") == []
    assert [(c.digest, c.mount_root) for c in store.caches()] == [
        (DIGEST, "/cache"),
        (DIGEST, "/kernels"),
    ]


# -- remove, size and last use -------------------------------------------------------------------


def marker_of(store: CacheStore, digest: str, mount_root: str) -> Path:
    path = store.path(digest, mount_root)
    return path.with_name(path.name + ".complete")


def test_remove_takes_one_entry_and_leaves_the_digests_other_roots(store: CacheStore) -> None:
    store.install(DIGEST, "/a", Filler())
    kept = store.install(DIGEST, "/b", Filler())

    removed = store.remove(DIGEST, "/a")

    assert removed == [StoredCache(DIGEST, "/a", store.path(DIGEST, "/a"))]
    assert not store.path(DIGEST, "/a").exists()
    assert not marker_of(store, DIGEST, "/a").exists()
    assert [c.path for c in store.caches()] == [kept]


def test_remove_without_a_mount_root_takes_every_root_of_the_digest(store: CacheStore) -> None:
    store.install(DIGEST, "/a", Filler())
    store.install(DIGEST, "/b", Filler())
    store.install(OTHER, "/a", Filler())

    removed = store.remove(DIGEST)

    assert [(c.digest, c.mount_root) for c in removed] == [(DIGEST, "/a"), (DIGEST, "/b")]
    assert [(c.digest, c.mount_root) for c in store.caches()] == [(OTHER, "/a")]
    assert not (store.root / "caches" / "sha256" / ("ab" * 32)).exists()


def test_remove_drops_the_entrys_lock_file(store: CacheStore) -> None:
    store.install(DIGEST, ROOT, Filler())
    store.install(OTHER, ROOT, Filler())

    store.remove(DIGEST)

    assert os.listdir(store.root / "locks") == [f"{'cd' * 32}-{ROOT_KEY}.lock"]
    fill = Filler()
    store.install(DIGEST, ROOT, fill)  # a new lock file, a new install
    assert fill.calls == 1


def test_remove_of_what_is_not_there_removes_nothing(store: CacheStore) -> None:
    store.install(OTHER, ROOT, Filler())

    assert store.remove(DIGEST, ROOT) == []
    assert store.remove(DIGEST) == []
    assert store.is_complete(OTHER, ROOT)


def test_remove_also_clears_a_crash_leftover_of_the_digest(store: CacheStore) -> None:
    store.install(DIGEST, "/a", Filler())
    leftover = store.path(DIGEST, "/b")
    leftover.mkdir()
    (leftover / "half.cubin").write_text("half")

    removed = store.remove(DIGEST)

    assert [c.mount_root for c in removed] == ["/a"]
    assert not leftover.exists()


def test_a_removed_entry_is_installed_again_by_the_next_install(store: CacheStore) -> None:
    store.install(DIGEST, ROOT, Filler())
    store.remove(DIGEST)
    fill = Filler("again")

    path = store.install(DIGEST, ROOT, fill)

    assert fill.calls == 1
    assert (path / "group" / "k.cubin").read_text() == "again"


def test_remove_waits_for_an_installer_of_the_same_entry(store: CacheStore) -> None:
    started, release = threading.Event(), threading.Event()
    removed: list[list[StoredCache]] = []

    def slow(tmp: Path) -> None:
        started.set()
        release.wait(timeout=10)
        (tmp / "k.cubin").write_text("k")

    installer = threading.Thread(target=store.install, args=(DIGEST, ROOT, slow))
    installer.start()
    assert started.wait(timeout=10)
    remover = threading.Thread(target=lambda: removed.append(store.remove(DIGEST, ROOT)))
    remover.start()
    remover.join(timeout=0.5)
    try:
        assert remover.is_alive()  # blocked on the installer's lock, not racing it
    finally:
        release.set()
        installer.join(timeout=10)
        remover.join(timeout=10)

    assert [c.mount_root for c in removed[0]] == [ROOT]
    assert not store.is_complete(DIGEST, ROOT)
    assert not store.path(DIGEST, ROOT).exists()


def test_an_install_after_its_digest_directory_went_still_lands(store: CacheStore) -> None:
    store.install(DIGEST, "/a", Filler())

    def fill(tmp: Path) -> None:
        store.remove(DIGEST, "/a")  # removes the now empty <hex>/ beside this fill
        (tmp / "k").write_text("k")

    assert store.install(DIGEST, "/b", fill) == store.path(DIGEST, "/b")
    assert store.is_complete(DIGEST, "/b")


def test_the_entry_size_is_its_bytes_on_disk_recorded_at_install(store: CacheStore) -> None:
    def fill(tmp: Path) -> None:
        (tmp / "g").mkdir()
        (tmp / "g" / "big").write_bytes(os.urandom(100_000))
        (tmp / "g" / "small").write_text("x")

    path = store.install(DIGEST, ROOT, fill)
    on_disk = sum(p.lstat().st_blocks * 512 for p in [path, *path.rglob("*")])

    assert store.entry_size(DIGEST, ROOT) == on_disk
    assert json.loads(marker_of(store, DIGEST, ROOT).read_text())["size_bytes"] == on_disk
    (path / "g" / "big").unlink()  # not re-walked: the recorded figure stands
    assert store.entry_size(DIGEST, ROOT) == on_disk


def test_an_old_marker_without_a_size_gets_one_once_and_keeps_its_last_use(
    store: CacheStore,
) -> None:
    path = store.install(DIGEST, ROOT, Filler())
    marker = marker_of(store, DIGEST, ROOT)
    marker.write_text(json.dumps({"digest": DIGEST, "mount_root": ROOT}))
    os.utime(marker, (1000.0, 1000.0))
    on_disk = sum(p.lstat().st_blocks * 512 for p in [path, *path.rglob("*")])

    assert store.entry_size(DIGEST, ROOT) == on_disk
    assert json.loads(marker.read_text())["size_bytes"] == on_disk
    assert marker.stat().st_mtime == 1000.0


def test_the_size_of_an_entry_not_installed_is_an_error(store: CacheStore) -> None:
    with pytest.raises(KcacheError, match="not installed"):
        store.entry_size(DIGEST, ROOT)


def test_touch_records_the_last_use_in_the_markers_mtime(store: CacheStore) -> None:
    store.install(DIGEST, ROOT, Filler())

    assert store.touch(DIGEST, ROOT, when=1234.5)

    assert marker_of(store, DIGEST, ROOT).stat().st_mtime == 1234.5
    (usage,) = CacheStore(store.root).usage()  # another process's store: survives a restart
    assert usage.last_used == 1234.5


def test_touch_of_an_entry_not_installed_says_so(store: CacheStore) -> None:
    assert not store.touch(DIGEST, ROOT)
    assert not marker_of(store, DIGEST, ROOT).exists()


def test_usage_lists_every_entry_with_its_size_and_last_use(store: CacheStore) -> None:
    store.install(DIGEST, "/b", Filler())
    store.install(DIGEST, "/a", Filler())
    store.install(OTHER, "/a", Filler())
    store.touch(DIGEST, "/a", when=10.0)
    store.touch(DIGEST, "/b", when=20.0)
    store.touch(OTHER, "/a", when=30.0)

    assert [(u.cache.digest, u.cache.mount_root, u.last_used) for u in store.usage()] == [
        (DIGEST, "/a", 10.0),
        (DIGEST, "/b", 20.0),
        (OTHER, "/a", 30.0),
    ]
    assert all(u.size_bytes == store.entry_size(DIGEST, "/a") for u in store.usage())


def test_a_crash_between_marker_and_directory_removal_leaves_no_served_entry(
    store: CacheStore,
) -> None:
    path = store.install(DIGEST, ROOT, Filler())
    marker_of(store, DIGEST, ROOT).unlink()  # the state remove leaves when killed right here

    assert store.installed(DIGEST, ROOT) is None
    assert store.caches() == []
    assert CacheStore(store.root).sweep() == [path]
    assert not path.exists()


def test_sweep_drops_a_marker_whose_directory_is_gone(store: CacheStore) -> None:
    path = store.install(DIGEST, ROOT, Filler())
    shutil.rmtree(path)

    assert CacheStore(store.root).sweep() == [marker_of(store, DIGEST, ROOT)]
    assert not marker_of(store, DIGEST, ROOT).exists()


def test_sweep_drops_a_half_written_marker_and_keeps_the_entry(store: CacheStore) -> None:
    path = store.install(DIGEST, ROOT, Filler())
    half = path.with_name(f".{path.name}.complete.tmp")
    half.write_text('{"digest": "sha')  # a marker write killed before its rename

    assert CacheStore(store.root).sweep() == [half]
    assert store.installed(DIGEST, ROOT) == path


def test_remove_drops_a_half_written_marker_with_its_entry(store: CacheStore) -> None:
    path = store.install(DIGEST, ROOT, Filler())
    path.with_name(f".{path.name}.complete.tmp").write_text("{")

    assert [c.path for c in store.remove(DIGEST)] == [path]
    assert not path.parent.exists()


def test_sweep_keeps_an_entry_whose_installer_is_at_work(store: CacheStore) -> None:
    path = store.path(DIGEST, ROOT)
    path.mkdir(parents=True)  # renamed into place, marker not yet written
    with holding_lock(store, f"{'ab' * 32}-{ROOT_KEY}"):
        assert CacheStore(store.root).sweep() == []
    assert path.is_dir()
