"""What a node object says, in the CRD's shape, and which times a rewrite keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.kcache.cluster import CacheKey, PodInfo
from gpufleet.kcache.node.gpus import read_gpus
from gpufleet.kcache.node.nodeobject import _with_times, _without_times, node_status
from gpufleet.kcache.node.settings import NodeSettings, parse_bytes
from gpufleet.kcache.node.state import CacheSpec, NodeState, Phase, Use
from gpufleet.kcache.objects import NodeStatus
from gpufleet.kcache.patches import merge_patch

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
KEY = CacheKey("GKMCache", "team-a", "vector-add")
POD = PodInfo("team-a", "app", "uid-1", "default")
GPUS = read_gpus(NvmlSource(sim.SimulatedNvml(sim.preset("dgx-h100"))))


def spec(digest: str | None = D1, *, deleting: bool = False) -> CacheSpec:
    image = None if digest is None else f"reg.example/c@{digest}"
    return CacheSpec(KEY, "u", 3, digest, image, "open", deleting)


def status(state: NodeState) -> dict[str, object] | None:
    return node_status(state, KEY, node_name="node-1", gpus=GPUS)


def test_a_running_digest_is_described_in_the_crds_node_status_shape() -> None:
    state = NodeState()
    state.set_cache(spec())
    state.update(KEY, D1, phase=Phase.EXTRACTED, mount_root="/cache", size=100)
    state.add_use(Use("csi-1", KEY, D1, "/cache", POD))

    content = status(state)

    assert content is not None
    parsed = NodeStatus.model_validate(_with_times(content, None, "2026-12-07T00:00:00Z"))
    entry = parsed.caches["vector-add"][D1]
    assert entry.state == Phase.RUNNING
    assert [p.volume_id for p in entry.pods] == ["csi-1"]
    assert parsed.observed_cache_generation == 3
    assert parsed.gpus[0].ids == list(range(8))


def test_a_cache_being_deleted_has_a_node_object_only_while_mounted() -> None:
    state = NodeState()
    state.set_cache(spec())
    state.update(KEY, D1, phase=Phase.EXTRACTED, mount_root="/cache")
    state.add_use(Use("csi-1", KEY, D1, "/cache", POD))
    state.set_cache(spec(deleting=True))
    assert status(state) is not None
    state.remove_use("csi-1")
    assert status(state) is None


def test_a_rewrite_keeps_the_transition_time_of_a_condition_whose_type_stays() -> None:
    state = NodeState()
    state.set_cache(spec())
    state.update(KEY, D1, phase=Phase.ERROR, message="connection refused")
    written = _with_times(status(state) or {}, None, "t0")
    state.update(KEY, D1, phase=Phase.ERROR, message="503 Service Unavailable")
    same_type = _with_times(status(state) or {}, written, "t1")
    state.update(KEY, D1, phase=Phase.EXTRACTED, mount_root="/cache")
    new_type = _with_times(status(state) or {}, same_type, "t2")

    def since(doc: dict[str, object]) -> object:
        return doc["caches"]["vector-add"][D1]["conditions"][0]["lastTransitionTime"]  # type: ignore[index]

    assert (since(written), since(same_type), since(new_type)) == ("t0", "t0", "t2")
    assert _without_times(new_type) == status(state)


def test_the_patch_of_a_moved_digest_removes_the_old_one() -> None:
    state = NodeState()
    state.set_cache(spec(D1))
    state.update(KEY, D1, phase=Phase.EXTRACTED, mount_root="/cache")
    before = _with_times(status(state) or {}, None, "t0")
    state.set_cache(spec(D2))
    after = _with_times(status(state) or {}, before, "t1")

    patch = merge_patch(before, after)

    assert patch["caches"]["vector-add"][D1] is None
    assert "gpus" not in patch


@pytest.mark.parametrize(
    ("text", "expected"), [("50Gi", 50 * 2**30), ("500M", 500 * 10**6), ("1024", 1024)]
)
def test_store_budgets_take_units(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_an_endpoint_longer_than_a_socket_path_may_be_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NODE_NAME", "node-1")
    monkeypatch.setenv("CSI_ENDPOINT", "unix:///" + "d" * 120)
    with pytest.raises(ConfigError, match=r"CSI_ENDPOINT=.*longer than the 107 bytes"):
        load_settings(NodeSettings)


def test_the_defaults_are_the_kubelets_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-1")
    settings = load_settings(NodeSettings)
    assert settings.csi_socket == Path("/var/lib/kubelet/plugins/csi-gkm/csi.sock")
    assert settings.kcache_store_max_bytes is None
