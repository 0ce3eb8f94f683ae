"""mountinfo parsing: fields, octal escapes, optional fields, stacked mounts, bind sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.kcache.mounts import (
    MountError,
    mounted_at,
    mounted_from,
    parse_mountinfo,
    read_mountinfo,
)

SAMPLE = (
    b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    b"27 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro\n"
    b"40 27 253:1 /var/lib/gpufleet/kcache /store rw,nosuid shared:1 master:7 - ext4 /dev/vda1 rw\n"
    b"41 27 253:1 /var/lib/gpufleet/kcache/caches/sha256/ab/cd"
    b" /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/kernels/mount"
    b" ro,nosuid,nodev,relatime shared:1 - ext4 /dev/vda1 rw\n"
    b"42 27 0:50 / /mnt/with\\040space\\011tab\\012nl\\134back rw - tmpfs my\\040tmp rw\n"
    b"43 42 0:51 / /mnt/with\\040space\\011tab\\012nl\\134back rw - tmpfs second rw\n"
)


def test_every_field_of_a_line_is_parsed() -> None:
    entry = parse_mountinfo(SAMPLE)[1]
    assert entry.mount_id == 27
    assert entry.parent_id == 1
    assert entry.device == "253:1"
    assert entry.root == "/"
    assert entry.mount_point == Path("/")
    assert entry.options == frozenset({"rw", "relatime"})
    assert entry.optional == ("shared:1",)
    assert entry.fstype == "ext4"
    assert entry.source == "/dev/vda1"
    assert entry.super_options == frozenset({"rw", "errors=remount-ro"})


def test_no_optional_fields_and_several_are_both_read() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert entries[0].optional == ()
    assert entries[2].optional == ("shared:1", "master:7")
    assert entries[2].fstype == "ext4"


def test_octal_escapes_are_decoded_in_paths_and_source() -> None:
    entry = parse_mountinfo(SAMPLE)[4]
    assert entry.mount_point == Path("/mnt/with space\ttab\nnl\\back")
    assert entry.source == "my tmp"


def test_a_backslash_not_followed_by_three_octal_digits_is_kept() -> None:
    (entry,) = parse_mountinfo(b"1 0 0:1 / /a\\9b\\07 rw - tmpfs t rw\n")
    assert entry.mount_point == Path("/a\\9b\\07")


def test_a_non_utf8_mount_point_round_trips_to_the_same_bytes() -> None:
    (entry,) = parse_mountinfo(b"1 0 0:1 / /caf\\351 rw - tmpfs t rw\n")
    assert bytes(entry.mount_point) == b"/caf\xe9"


def test_read_only_comes_from_the_per_mount_options() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert entries[3].read_only
    assert not entries[2].read_only  # super options say rw for both


def test_a_line_without_the_separator_is_an_error_naming_the_line() -> None:
    with pytest.raises(MountError, match="line 2"):
        parse_mountinfo(b"1 0 0:1 / / rw - tmpfs t rw\n2 1 0:2 / /x rw tmpfs t rw\n")


def test_mounted_at_finds_the_top_of_stacked_mounts() -> None:
    entries = parse_mountinfo(SAMPLE)
    top = mounted_at(Path("/mnt/with space\ttab\nnl\\back"), entries)
    assert top is not None
    assert top.mount_id == 43


def test_mounted_at_a_plain_directory_is_none() -> None:
    assert mounted_at(Path("/var/lib/kubelet"), parse_mountinfo(SAMPLE)) is None


def test_a_bind_mount_is_matched_to_its_source_through_another_mount_of_the_filesystem() -> None:
    entries = parse_mountinfo(SAMPLE)
    target = Path("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/kernels/mount")
    # /store shows /var/lib/gpufleet/kcache of 253:1, so /store/caches/... is the bind's root.
    assert mounted_from(target, Path("/store/caches/sha256/ab/cd"), entries)
    assert mounted_from(target, Path("/var/lib/gpufleet/kcache/caches/sha256/ab/cd"), entries)
    assert not mounted_from(target, Path("/store/caches/sha256/ab/other"), entries)
    assert not mounted_from(Path("/elsewhere"), Path("/store/caches/sha256/ab/cd"), entries)


def test_read_mountinfo_of_this_process_has_the_root_mount() -> None:
    assert any(e.mount_point == Path("/") for e in read_mountinfo())


def test_read_mountinfo_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="nothing"):
        read_mountinfo(tmp_path / "nothing")
