"""Publication records: durable, one per volume id, live only while mounted, never crash on junk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from gpufleet.kcache.cluster import CacheKey, PodInfo
from gpufleet.kcache.mounts import parse_mountinfo
from gpufleet.kcache.publications import (
    MAX_RECORD_BYTES,
    Publication,
    PublicationError,
    PublicationLog,
)

TARGET = Path("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/kernels/mount")
SOURCE = Path("/store/caches/sha256/ab/cd")
PUB = Publication(
    volume_id="csi-" + "1" * 64,
    target_path=TARGET,
    cache=CacheKey("GKMCache", "team-a", "vector-add-cache"),
    pod=PodInfo(namespace="team-a", name="app", uid="u1", service_account="default"),
    digest="sha256:" + "ab" * 32,
    mount_root="/cache",
    source=SOURCE,
    created_target=True,
    published_at=1700000000.5,
)
MOUNTINFO = (
    b"27 1 253:1 / / rw - ext4 /dev/vda1 rw\n"
    b"40 27 253:1 / /store rw - ext4 /dev/vda1 rw\n"
    b"41 27 253:1 /caches/sha256/ab/cd " + bytes(TARGET) + b" ro - ext4 /dev/vda1 rw\n"
)


def _file(log: PublicationLog, volume_id: str) -> Path:
    return log.directory / f"{hashlib.sha256(volume_id.encode()).hexdigest()}.json"


def test_a_recorded_publication_reads_back_equal(tmp_path: Path) -> None:
    log = PublicationLog(tmp_path / "publications")
    log.record(PUB)
    assert PublicationLog(tmp_path / "publications").get(PUB.volume_id) == PUB


def test_a_cluster_cache_record_reads_back_equal(tmp_path: Path) -> None:
    log = PublicationLog(tmp_path)
    pub = replace(PUB, cache=CacheKey("ClusterGKMCache", None, "shared"))
    log.record(pub)
    assert log.get(pub.volume_id) == pub


def test_one_file_per_volume_id_named_by_its_hash_and_private(tmp_path: Path) -> None:
    log = PublicationLog(tmp_path / "publications")
    log.record(PUB)
    log.record(replace(PUB, volume_id="../../etc/passwd"))
    names = sorted(p.name for p in log.directory.iterdir())
    assert names == sorted(
        f"{hashlib.sha256(v.encode()).hexdigest()}.json"
        for v in (PUB.volume_id, "../../etc/passwd")
    )
    assert log.directory.stat().st_mode & 0o777 == 0o700
    assert _file(log, PUB.volume_id).stat().st_mode & 0o777 == 0o600


def test_recording_again_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    log = PublicationLog(tmp_path)
    log.record(PUB)
    log.record(replace(PUB, digest="sha256:" + "ef" * 32))
    assert [p.digest for p in log.all()] == ["sha256:" + "ef" * 32]
    assert [p.name for p in tmp_path.iterdir()] == [_file(log, PUB.volume_id).name]


def test_remove_forgets_and_removing_an_unknown_one_is_fine(tmp_path: Path) -> None:
    log = PublicationLog(tmp_path)
    log.record(PUB)
    log.remove(PUB.volume_id)
    log.remove(PUB.volume_id)
    assert log.get(PUB.volume_id) is None
    assert log.all() == []


def test_an_absent_directory_holds_no_records(tmp_path: Path) -> None:
    assert PublicationLog(tmp_path / "none").all() == []


def test_live_keeps_only_records_still_mounted_from_their_source(tmp_path: Path) -> None:
    log = PublicationLog(tmp_path)
    log.record(PUB)
    gone = replace(PUB, volume_id="csi-gone", target_path=Path("/var/lib/kubelet/pods/u2/x"))
    moved = replace(PUB, volume_id="csi-moved", source=Path("/store/caches/sha256/ab/other"))
    log.record(gone)
    log.record(moved)
    assert log.live(parse_mountinfo(MOUNTINFO)) == [PUB]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"version": 2}',
        json.dumps({**PUB.to_json(), "created_target": "yes"}).encode(),
        json.dumps({**PUB.to_json(), "cache": {"kind": "Pod", "name": "x"}}).encode(),
        json.dumps({**PUB.to_json(), "cache": {"kind": "GKMCache", "name": "x"}}).encode(),
        b" " * (MAX_RECORD_BYTES + 1),
    ],
    ids=["torn", "binary", "list", "version", "type", "kind", "namespace", "oversized"],
)
def test_a_corrupt_record_is_logged_moved_aside_and_the_others_still_read(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    log = PublicationLog(tmp_path)
    log.record(PUB)
    bad = _file(log, "csi-bad")
    bad.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="gpufleet.kcache.publications"):
        assert log.all() == [PUB]
    assert not bad.exists()
    assert bad.with_name(bad.name + ".corrupt").read_bytes() == content
    assert [r.getMessage() for r in caplog.records] == ["corrupt publication record moved aside"]
    assert log.all() == [PUB]  # once aside, not reported again


def test_a_record_under_another_volume_ids_name_is_not_trusted(tmp_path: Path) -> None:
    log = PublicationLog(tmp_path)
    log.record(PUB)
    os.rename(_file(log, PUB.volume_id), _file(log, "csi-other"))
    assert log.get("csi-other") is None
    assert log.all() == []


def test_get_of_a_corrupt_record_is_none(tmp_path: Path) -> None:
    log = PublicationLog(tmp_path)
    _file(log, PUB.volume_id).write_bytes(b"{")
    assert log.get(PUB.volume_id) is None


def test_a_record_too_large_to_read_back_is_refused_at_write(tmp_path: Path) -> None:
    log = PublicationLog(tmp_path)
    with pytest.raises(PublicationError, match="over"):
        log.record(replace(PUB, volume_id="v" * MAX_RECORD_BYTES))
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_directory_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    log = PublicationLog(tmp_path / "file" / "publications")
    with pytest.raises(PublicationError, match="cannot write"):
        log.record(PUB)
