"""The content-addressed store: atomic installs, at most one fill per digest, crash recovery."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from gpufleet.kcache.errors import KcacheError
from gpufleet.kcache.store import CacheStore

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


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


def test_the_path_of_a_digest_is_root_sha256_hex(store: CacheStore) -> None:
    assert store.path(DIGEST) == store.root / "sha256" / ("ab" * 32)


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
        store.path(digest)
    with pytest.raises(KcacheError, match="not a sha256 digest"):
        store.install(digest, Filler())


def test_install_fills_once_and_a_second_install_does_nothing(store: CacheStore) -> None:
    fill = Filler()

    first = store.install(DIGEST, fill)
    second = store.install(DIGEST, fill)

    assert first == second == store.path(DIGEST)
    assert fill.calls == 1
    assert (first / "group" / "k.cubin").read_text() == "kernels"
    assert store.is_complete(DIGEST)


def test_fill_works_in_a_temporary_directory_on_the_stores_filesystem(store: CacheStore) -> None:
    fill = Filler()
    store.install(DIGEST, fill)

    (tmp,) = fill.seen
    assert tmp.parent == store.root / "tmp"
    assert not tmp.exists()
    assert os.listdir(store.root / "tmp") == []


def test_the_cache_is_not_complete_while_it_is_being_filled(store: CacheStore) -> None:
    seen: list[bool] = []

    def fill(tmp: Path) -> None:
        seen.append(store.is_complete(DIGEST))
        (tmp / "f").write_text("x")

    store.install(DIGEST, fill)

    assert seen == [False]
    assert store.is_complete(DIGEST)


def test_an_installed_cache_is_readable_by_other_users(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        path = CacheStore(tmp_path / "store").install(DIGEST, Filler())
    finally:
        os.umask(old)

    assert path.stat().st_mode & 0o777 == 0o755


def test_a_failed_fill_leaves_no_trace(store: CacheStore) -> None:
    def fill(tmp: Path) -> None:
        (tmp / "half").write_text("written")
        raise RuntimeError("layer refused")

    with pytest.raises(RuntimeError, match="layer refused"):
        store.install(DIGEST, fill)

    assert not store.path(DIGEST).exists()
    assert not store.is_complete(DIGEST)
    assert os.listdir(store.root / "tmp") == []
    assert os.listdir(store.root / "sha256") == []


def fail(tmp: Path) -> None:
    raise RuntimeError("boom")


def test_a_failed_fill_is_retried_by_the_next_install(store: CacheStore) -> None:
    with pytest.raises(RuntimeError):
        store.install(DIGEST, fail)

    fill = Filler()
    store.install(DIGEST, fill)

    assert fill.calls == 1
    assert store.is_complete(DIGEST)


def test_a_crash_leftover_without_its_marker_is_removed_and_redone(store: CacheStore) -> None:
    leftover = store.path(DIGEST)
    leftover.mkdir(parents=True)
    (leftover / "truncated.cubin").write_text("half")
    stale_tmp = store.root / "tmp" / f"{'ab' * 32}.crashed"
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "x").write_text("half")
    other_tmp = store.root / "tmp" / f"{'cd' * 32}.busy"
    other_tmp.mkdir()
    assert not store.is_complete(DIGEST)

    fill = Filler()
    path = store.install(DIGEST, fill)

    assert fill.calls == 1
    assert sorted(p.name for p in path.rglob("*")) == ["group", "k.cubin"]
    assert not stale_tmp.exists()
    assert other_tmp.exists()  # another digest's installer may be at work


def test_a_marker_alone_is_not_a_complete_cache(store: CacheStore) -> None:
    store.install(DIGEST, Filler())
    shutil.rmtree(store.path(DIGEST))

    assert not store.is_complete(DIGEST)
    fill = Filler()
    store.install(DIGEST, fill)
    assert fill.calls == 1


def test_two_threads_installing_one_digest_fill_once(store: CacheStore) -> None:
    fill = Filler(delay=0.3)
    results: list[Path] = []
    errors: list[BaseException] = []

    def install() -> None:
        try:
            results.append(store.install(DIGEST, fill))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert errors == []
    assert results == [store.path(DIGEST)] * 2
    assert fill.calls == 1


def test_installers_of_different_digests_do_not_wait_for_each_other(store: CacheStore) -> None:
    started = threading.Event()
    release = threading.Event()

    def slow(tmp: Path) -> None:
        started.set()
        release.wait(timeout=10)
        (tmp / "a").write_text("a")

    thread = threading.Thread(target=store.install, args=(DIGEST, slow))
    thread.start()
    try:
        assert started.wait(timeout=10)
        other = store.install(OTHER, Filler())  # would block here if the lock were global
        assert store.is_complete(OTHER)
        assert not store.is_complete(DIGEST)
    finally:
        release.set()
        thread.join(timeout=10)
    assert other == store.path(OTHER)
    assert store.is_complete(DIGEST)


def test_a_volatile_store_installs_the_same_way(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "store", durable=False)
    fill = Filler()

    assert store.install(DIGEST, fill) == store.path(DIGEST)
    assert store.install(DIGEST, fill) == store.path(DIGEST)
    assert fill.calls == 1
