"""What the CSI plugin accepts: target paths, volume contexts, volume ids, the endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.core.errors import ConfigError
from gpufleet.kcache.cluster import CacheKey, PodInfo
from gpufleet.kcache.csi import CsiEndpointError, parse_endpoint
from gpufleet.kcache.csi.attributes import check_volume_id, read_volume_context
from gpufleet.kcache.csi.targets import TargetChecker
from gpufleet.kcache.errors import InvalidVolumeError

UID = "0d2a6c1e-5b7f-4c1a-9e3d-2f1b8a7c6d5e"
POD = {
    "csi.storage.k8s.io/pod.name": "app-1",
    "csi.storage.k8s.io/pod.namespace": "team-a",
    "csi.storage.k8s.io/pod.uid": UID,
    "csi.storage.k8s.io/serviceAccount.name": "default",
    "csi.storage.k8s.io/ephemeral": "true",
}


def _target(kubelet: Path, uid: str = UID, volume: str = "kernels") -> Path:
    parent = kubelet / "pods" / uid / "volumes" / "kubernetes.io~csi" / volume
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def test_a_kubelet_target_yields_its_pod_uid_and_volume_name(tmp_path: Path) -> None:
    target = _target(tmp_path)
    checked = TargetChecker(tmp_path).check(str(target), pod_uid=UID)
    assert (checked.path, checked.pod_uid, checked.volume_name) == (target, UID, "kernels")


def test_a_symlinked_kubelet_dir_is_allowed(tmp_path: Path) -> None:
    real = tmp_path / "data" / "kubelet"
    real.mkdir(parents=True)
    (tmp_path / "kubelet").symlink_to(real)
    target = _target(tmp_path / "kubelet")
    assert TargetChecker(tmp_path / "kubelet").check(str(target), pod_uid=UID).path == target


def test_a_trailing_slash_on_the_kubelet_dir_changes_nothing(tmp_path: Path) -> None:
    target = _target(tmp_path)
    assert TargetChecker(Path(f"{tmp_path}/")).check(str(target)).path == target


def test_another_pods_target_is_refused_naming_both_uids(tmp_path: Path) -> None:
    target = _target(tmp_path, uid="other-uid")
    with pytest.raises(InvalidVolumeError, match=f"other-uid.*{UID}"):
        TargetChecker(tmp_path).check(str(target), pod_uid=UID)


def test_a_symlinked_volume_dir_is_refused(tmp_path: Path) -> None:
    csi = tmp_path / "pods" / UID / "volumes" / "kubernetes.io~csi"
    csi.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (csi / "kernels").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidVolumeError, match="symlink"):
        TargetChecker(tmp_path).check(str(csi / "kernels" / "mount"))


def test_a_file_where_a_directory_belongs_is_refused(tmp_path: Path) -> None:
    target = _target(tmp_path)
    target.write_text("")
    with pytest.raises(InvalidVolumeError, match="not a directory"):
        TargetChecker(tmp_path).check(str(target))


def test_the_kubelets_exact_context_names_a_gkmcache_for_the_pod() -> None:
    context = {**POD, "csi.gkm.io/GKMCache": "vector-add-cache", "csi.gkm.io/namespace": "team-a"}
    read = read_volume_context(context)
    assert read.cache == CacheKey("GKMCache", "team-a", "vector-add-cache")
    assert read.pod == PodInfo("team-a", "app-1", UID, "default")
    assert read.namespace_attribute == "team-a"


def test_other_attributes_of_the_user_are_ignored() -> None:
    context = {**POD, "csi.gkm.io/ClusterGKMCache": "shared", "team.example/owner": "ml"}
    assert read_volume_context(context).cache == CacheKey("ClusterGKMCache", None, "shared")


def test_an_unknown_gkm_attribute_is_refused_naming_it() -> None:
    context = {**POD, "csi.gkm.io/GKMCache": "c", "csi.gkm.io/nameSpace": "team-a"}
    with pytest.raises(InvalidVolumeError, match=r"csi\.gkm\.io/nameSpace"):
        read_volume_context(context)


def test_missing_pod_info_says_to_set_pod_info_on_mount() -> None:
    context = {"csi.storage.k8s.io/ephemeral": "true", "csi.gkm.io/GKMCache": "c"}
    with pytest.raises(InvalidVolumeError, match="podInfoOnMount"):
        read_volume_context(context)


@pytest.mark.parametrize("volume_id", ["", "with space", "tab\t", "é", "x" * 257])
def test_a_bad_volume_id_is_refused(volume_id: str) -> None:
    with pytest.raises(InvalidVolumeError):
        check_volume_id(volume_id)


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        (
            "unix:///var/lib/kubelet/plugins/csi-gkm/csi.sock",
            "/var/lib/kubelet/plugins/csi-gkm/csi.sock",
        ),
        ("unix:/run/csi.sock", "/run/csi.sock"),
    ],
)
def test_the_endpoint_is_a_unix_socket_path(endpoint: str, path: str) -> None:
    assert parse_endpoint(endpoint) == Path(path)


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("/run/csi.sock", "unix:///"),
        ("tcp://127.0.0.1:10000", "unix:///"),
        ("unix://relative/csi.sock", "absolute"),
        ("unix:relative", "absolute"),
        ("unix:///" + "x" * 120, "107 bytes"),
    ],
)
def test_a_bad_endpoint_is_a_configuration_error_naming_the_setting(
    endpoint: str, why: str
) -> None:
    with pytest.raises(CsiEndpointError, match=why) as caught:
        parse_endpoint(endpoint)
    assert isinstance(caught.value, ConfigError)
    assert "CSI_ENDPOINT" in str(caught.value)
