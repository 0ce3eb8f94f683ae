"""Real read-only bind mounts (as root): writes fail with EROFS, unmount restores, source intact."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.kcache.mounts import (
    MountError,
    bind_read_only,
    mounted_at,
    mounted_from,
    read_mountinfo,
    unmount,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root"),
]


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory for sources and targets; anything still mounted under it is unmounted."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="kc-mnt-"))
    yield root
    for entry in reversed(read_mountinfo()):
        if root in entry.mount_point.parents:
            subprocess.run(["umount", "-l", os.fspath(entry.mount_point)], check=False)
    shutil.rmtree(root)


def _source(place: Path) -> Path:
    source = place / "store" / "entry"
    (source / "triton").mkdir(parents=True)
    (source / "triton" / "kernel.cubin").write_bytes(b"cubin")
    return source


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        os.fspath(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


def test_a_write_under_the_target_fails_with_erofs(place: Path) -> None:
    source, target = _source(place), place / "target"
    target.mkdir()
    bind_read_only(source, target)
    assert (target / "triton" / "kernel.cubin").read_bytes() == b"cubin"
    with pytest.raises(OSError, match="Read-only file system") as new_file:
        (target / "new").write_bytes(b"x")
    assert new_file.value.errno == errno.EROFS
    with pytest.raises(OSError, match="Read-only file system") as overwrite:
        (target / "triton" / "kernel.cubin").write_bytes(b"evil")
    assert overwrite.value.errno == errno.EROFS


def test_the_target_shows_up_in_mountinfo_read_only_nosuid_from_its_source(place: Path) -> None:
    source, target = _source(place), place / "target"
    target.mkdir()
    bind_read_only(source, target)
    entries = read_mountinfo()
    entry = mounted_at(target, entries)
    assert entry is not None
    assert {"ro", "nosuid", "nodev"} <= entry.options
    assert mounted_from(target, source, entries)
    assert not mounted_from(target, source / "triton", entries)


def test_unmount_restores_the_target_and_leaves_the_source_unchanged(place: Path) -> None:
    source, target = _source(place), place / "target"
    target.mkdir()
    before = _snapshot(source)
    bind_read_only(source, target)
    unmount(target)
    assert mounted_at(target, read_mountinfo()) is None
    assert list(target.iterdir()) == []
    (target / "writable").write_bytes(b"yes")
    assert _snapshot(source) == before
    (source / "still-writable").write_bytes(b"yes")


def test_a_source_on_a_nosuid_noexec_mount_is_bound_read_only_keeping_its_flags(
    place: Path,
) -> None:
    fs = place / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,noexec,size=1m", "kc", fs], check=True)
    (fs / "entry").mkdir()
    target = place / "target"
    target.mkdir()
    bind_read_only(fs / "entry", target)
    entry = mounted_at(target, read_mountinfo())
    assert entry is not None
    assert {"ro", "noexec", "nosuid"} <= entry.options


def test_binding_a_missing_source_fails_naming_both_and_mounts_nothing(place: Path) -> None:
    target = place / "target"
    target.mkdir()
    with pytest.raises(MountError, match=f"{place / 'missing'} at {target}"):
        bind_read_only(place / "missing", target)
    assert mounted_at(target, read_mountinfo()) is None


def test_unmounting_a_plain_directory_fails_naming_it(place: Path) -> None:
    with pytest.raises(MountError, match=f"{place}: not a mount point"):
        unmount(place)


def test_unmount_does_not_follow_a_symlink_to_a_mount(place: Path) -> None:
    source, target = _source(place), place / "target"
    target.mkdir()
    bind_read_only(source, target)
    (place / "link").symlink_to(target)
    with pytest.raises(MountError):
        unmount(place / "link")
    assert mounted_at(target, read_mountinfo()) is not None
