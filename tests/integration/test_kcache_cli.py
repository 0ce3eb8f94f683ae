"""``gpufleet cache`` end to end: real Triton kernels, the real registry, the real CLI.

Kernels are compiled ahead of time for cuda arch 80 and 90, packed, pushed to
Debian's docker-registry, pulled and extracted into a store; then Triton
compiles the same kernels against the extracted cache and must not compile
anything.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from gpufleet.kcache.image import DEFAULT_MOUNT_ROOT, build_image
from gpufleet.kcache.oci import RegistryClient, sha256_digest
from gpufleet.kcache.reference import Reference
from gpufleet.kcache.store import CacheStore
from gpufleet.kcache.transfer import push_image
from tests.conftest import require
from tests.doubles.registry import RecordingTransport
from tests.integration.kcache_cli_support import GPUFLEET, cache_cli, write_keys
from tests.kcache_support import build_triton_cache, compile_again, group_dirs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Triton cache with two kernels for arch 80 and 90 (built once for the module)."""
    cache = tmp_path_factory.mktemp("triton") / "cache"
    build_triton_cache(cache)
    return cache


@pytest.fixture
def cache_copy(tmp_path: Path) -> Path:
    """A private cache a test may delete: compiled in place so its __grp__ paths are its own."""
    cache = tmp_path / "cache"
    build_triton_cache(cache)
    return cache


@pytest.fixture
def registry(test_servers: dict[str, str]) -> str:
    (address,) = require(test_servers, "GPUFLEET_TEST_REGISTRY")
    return address


def new_ref(registry: str, name: str = "kernels") -> str:
    return f"{registry}/kcache-cli/{name}-{uuid.uuid4().hex[:8]}:v1"


def build(directory: Path, ref: str, *extra: str) -> str:
    """Push ``directory`` to ``ref``; returns the manifest digest the CLI printed."""
    out = cache_cli("build", str(directory), "-t", ref, *extra).stdout.strip()
    assert out.startswith(ref + "@sha256:")
    return out.rsplit("@", 1)[1]


def test_inspect_shows_both_targets_of_a_real_cache(compiled: Path, registry: str) -> None:
    ref = new_ref(registry)
    build(compiled, ref)
    summary = json.loads(cache_cli("inspect", ref, "--json").stdout)
    targets = {(t["backend"], t["arch"], t["warp_size"]) for t in summary["targets"]}
    assert targets == {("cuda", 80, 32), ("cuda", 90, 32)}
    assert summary["kind"] == "triton"
    assert summary["entry_count"] == 4
    assert set(summary["kernel_names"]) == {"add", "scale"}
    local = json.loads(cache_cli("inspect", str(compiled), "--json").stdout)
    assert local["targets"] == summary["targets"]


def test_check_matches_h100_to_arch_90_and_not_80(compiled: Path, registry: str) -> None:
    ref = new_ref(registry)
    build(compiled, ref)
    result = cache_cli("check", ref, "--simulate", "dgx-h100", "--json")
    verdicts = json.loads(result.stdout)
    assert len(verdicts) == 8
    assert {v["target"] for v in verdicts} == {"cuda/90/32"}
    assert all(v["matches"] for v in verdicts)


def test_check_exits_1_when_no_gpu_matches(tmp_path: Path, registry: str) -> None:
    only_80 = tmp_path / "a100-only"
    build_triton_cache(only_80, archs=(80,))
    result = cache_cli("check", str(only_80), "--simulate", "dgx-h100", check=False)
    assert result.returncode == 1
    assert "no kernels for cuda arch 90" in " ".join(result.stdout.split())
    a100 = cache_cli("check", str(only_80), "--simulate", "dgx-a100", check=False)
    assert a100.returncode == 0


def test_check_exits_2_on_error(tmp_path: Path) -> None:
    result = cache_cli("check", "127.0.0.1:1/nothing/here:v1", "--simulate", "l4", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_building_twice_gives_the_same_digest(compiled: Path, registry: str) -> None:
    assert build(compiled, new_ref(registry)) == build(compiled, new_ref(registry))


def test_the_extracted_cache_is_hit_after_the_original_is_deleted(
    cache_copy: Path, tmp_path: Path, registry: str
) -> None:
    ref = new_ref(registry)
    digest = build(cache_copy, ref)
    groups = group_dirs(cache_copy)
    shutil.rmtree(cache_copy)
    store = tmp_path / "store"
    pod = tmp_path / "pod" / "kernels"
    out = cache_cli("extract", ref, "--store", str(store), "--mount-root", str(pod))
    path = Path(out.stdout.strip())
    assert path == CacheStore(store).installed(digest, str(pod))
    mount(path, pod)
    report = compile_again(pod)
    assert (report.compiled, report.cache_hits) == (0, 4)
    assert group_dirs(path) == groups


def mount(path: Path, at: Path) -> None:
    """Show the cache at `path` where a pod would see it, `at`, as a bind mount would."""
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(path, target_is_directory=True)


def child_paths(cache: Path) -> list[str]:
    """Every child path the ``__grp__`` files of an extracted Triton cache name."""
    names = []
    for group_file in cache.glob("*/__grp__*.json"):
        names.extend(json.loads(group_file.read_text())["child_paths"].values())
    assert names, f"no __grp__ files under {cache}"
    return names


def test_one_image_extracted_for_two_mount_roots_gives_two_caches_each_naming_its_own_root(
    cache_copy: Path, tmp_path: Path, registry: str
) -> None:
    ref = new_ref(registry)
    digest = build(cache_copy, ref)
    shutil.rmtree(cache_copy)
    store = tmp_path / "store"
    first, second = tmp_path / "pod-a" / "kernels", tmp_path / "pod-b" / "kernels"
    paths = {}
    for root in (first, second):
        out = cache_cli("extract", ref, "--store", str(store), "--mount-root", str(root))
        paths[root] = Path(out.stdout.strip())
        assert paths[root] == CacheStore(store).installed(digest, str(root))
    assert paths[first] != paths[second]
    for root, path in paths.items():
        assert all(c.startswith(f"{root}/") for c in child_paths(path))
    assert [(c.mount_root, c.path) for c in CacheStore(store).caches()] == sorted(
        (str(root), path) for root, path in paths.items()
    )
    # Each pod sees only its own mount: Triton must hit every kernel through it.
    mount(paths[second], second)
    report = compile_again(second)
    assert (report.compiled, report.cache_hits) == (0, 4)


def test_without_the_rewrite_the_moved_cache_misses(
    cache_copy: Path, tmp_path: Path, registry: str
) -> None:
    ref = new_ref(registry)
    build(cache_copy, ref)
    shutil.rmtree(cache_copy)
    out = cache_cli(
        "extract", ref, "--store", str(tmp_path / "store"), "--mount-root", "/not/where/it/is"
    )
    report = compile_again(Path(out.stdout.strip()))
    assert report.compiled == 4


def test_a_second_extract_of_the_same_digest_does_nothing(
    compiled: Path, tmp_path: Path, registry: str
) -> None:
    ref = new_ref(registry)
    build(compiled, ref)
    store = tmp_path / "store"
    args = ("extract", ref, "--store", str(store), "--mount-root", "/var/cache/k")
    path = Path(cache_cli(*args).stdout.strip())
    marker_time = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    assert Path(cache_cli(*args).stdout.strip()) == path
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == marker_time


def test_a_flipped_byte_in_the_registry_fails_the_pull(
    compiled: Path, tmp_path: Path, registry: str, test_servers: dict[str, str]
) -> None:
    (data_root,) = require(test_servers, "GPUFLEET_TEST_REGISTRY_DATA")
    ref = new_ref(registry)
    build(compiled, ref)
    parsed = Reference.parse(ref)
    with RegistryClient(parsed.registry) as client:
        raw, _, _ = client.get_manifest(parsed.repository, "v1")
    layer = json.loads(raw)["layers"][0]["digest"].split(":", 1)[1]
    blob = Path(data_root) / "docker/registry/v2/blobs/sha256" / layer[:2] / layer / "data"
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
        store = tmp_path / "store"
        result = cache_cli("extract", ref, "--store", str(store), "--mount-root", "/m", check=False)
        assert result.returncode != 0
        assert "sha256:" + layer in result.stderr
        assert installed(store) == []
    finally:
        blob.write_bytes(original)


def installed(store: Path) -> list[Path]:
    """Caches the store holds: installed ones, and any directory a failed install left."""
    return sorted(p for p in (store / "caches" / "sha256").glob("*/*") if p.is_dir())


def test_signed_images_verify_and_extract_only_with_the_right_key(
    compiled: Path, tmp_path: Path, registry: str
) -> None:
    mine_key, mine_pub = write_keys(tmp_path, "mine")
    _, other_pub = write_keys(tmp_path, "other")
    ref = new_ref(registry)
    digest = build(compiled, ref)
    unsigned = cache_cli("verify", ref, "--key", str(mine_pub), check=False)
    assert unsigned.returncode != 0
    cache_cli("sign", ref, "--key", str(mine_key))
    assert cache_cli("verify", ref, "--key", str(mine_pub)).stdout.strip() == digest
    wrong = cache_cli("verify", ref, "--key", str(other_pub), check=False)
    assert wrong.returncode != 0
    store = tmp_path / "store"
    ok = cache_cli(
        "extract", ref, "--store", str(store), "--mount-root", "/m", "--verify-key", str(mine_pub)
    )
    assert digest.split(":", 1)[1] in ok.stdout
    refused = cache_cli(
        "extract", ref, "--store", str(tmp_path / "s2"), "--mount-root", "/m",
        "--verify-key", str(other_pub), check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert installed(tmp_path / "s2") == []


def test_a_retagged_different_image_is_refused_by_verify(
    compiled: Path, tmp_path: Path, registry: str
) -> None:
    key, pub = write_keys(tmp_path, "k")
    signed_ref = new_ref(registry, "signed")
    build(compiled, signed_ref)
    cache_cli("sign", signed_ref, "--key", str(key))
    only_80 = tmp_path / "only80"
    build_triton_cache(only_80, archs=(80,))
    # Push a different image under the signed image's tag: the signature names the old digest.
    build(only_80, signed_ref)
    result = cache_cli("verify", signed_ref, "--key", str(pub), check=False)
    assert result.returncode != 0
    assert "signature" in result.stderr.lower()


def test_push_and_pull_need_credentials_on_an_htpasswd_registry(
    compiled: Path, tmp_path: Path, test_servers: dict[str, str]
) -> None:
    address, user, password = require(
        test_servers,
        "GPUFLEET_TEST_REGISTRY_AUTH",
        "GPUFLEET_TEST_REGISTRY_AUTH_USER",
        "GPUFLEET_TEST_REGISTRY_AUTH_PASSWORD",
    )
    ref = f"{address}/kcache-cli/private:v1"
    anonymous = cache_cli("build", str(compiled), "-t", ref, check=False)
    assert anonymous.returncode != 0
    assert "Traceback" not in anonymous.stderr
    creds = {"REGISTRY_USERNAME": user, "REGISTRY_PASSWORD": password}
    cache_cli("build", str(compiled), "-t", ref, env=creds)
    summary = json.loads(cache_cli("inspect", ref, "--json", env=creds).stdout)
    assert summary["entry_count"] == 4


def test_mount_from_pushes_an_image_to_a_new_repository_without_uploading_the_layer(
    compiled: Path, tmp_path: Path, registry: str
) -> None:
    first = new_ref(registry, "first")
    digest = build(compiled, first)
    source = Reference.parse(first).repository
    second = new_ref(registry, "second")
    built = build_image(compiled, tmp_path, mount_root=DEFAULT_MOUNT_ROOT)
    transport = RecordingTransport()  # client.requests keeps no query: the mount is in it
    with RegistryClient(registry, transport=transport) as client:
        pushed = push_image(client, Reference.parse(second), built, mount_from=source)
        sent = list(client.requests)
    assert pushed == digest
    repo = Reference.parse(second).repository
    assert any("mount" in url.params for url in transport.urls)
    assert not any(m in ("PATCH", "PUT") and f"/v2/{repo}/blobs/" in p for m, p in sent)
    assert cache_cli("build", str(compiled), "-t", second, "--mount-from", source).returncode == 0


def test_a_vllm_cache_is_hit_at_its_nested_triton_path_after_extraction(
    tmp_path: Path, registry: str
) -> None:
    source = tmp_path / "vllm"
    rank = source / "torch_compile_cache" / "d4ec7c2a7d" / "rank_0_0"
    build_triton_cache(rank / "triton_cache")  # compiled in place: its own absolute paths
    (rank / "inductor_cache" / "47").mkdir(parents=True)
    (rank / "inductor_cache" / "47" / "c47v2of4lrhyox6un5t4z2l3xr.py").write_text("# kernel\n")
    (rank / "cache_key_factors.json").write_text('{"code_hash": "0", "env": {}}')
    ref = new_ref(registry, "vllm")
    digest = build(source, ref)
    assert json.loads(cache_cli("inspect", ref, "--json").stdout)["kind"] == "vllm"
    shutil.rmtree(source)
    store = tmp_path / "store"
    pod = tmp_path / "pod" / "vllm"
    out = cache_cli("extract", ref, "--store", str(store), "--mount-root", str(pod))
    assert Path(out.stdout.strip()) == CacheStore(store).installed(digest, str(pod))
    mount(Path(out.stdout.strip()), pod)
    nested = pod / "torch_compile_cache" / "d4ec7c2a7d" / "rank_0_0" / "triton_cache"
    assert compile_again(nested).compiled == 0


def test_extract_without_mount_root_uses_the_one_the_image_names(
    compiled: Path, tmp_path: Path, registry: str
) -> None:
    ref = new_ref(registry)
    build(compiled, ref, "--mount-root", "/var/cache/from-label")
    path = Path(cache_cli("extract", ref, "--store", str(tmp_path / "store")).stdout.strip())
    (group_file,) = list(path.glob("*/__grp__add.json"))[:1]
    children = json.loads(group_file.read_text())["child_paths"].values()
    assert all(c.startswith(f"/var/cache/from-label/{group_file.parent.name}/") for c in children)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command wrote on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("target", ["./nope", "../nope", "/nonexistent/nope", "~/nope"])
def test_inspecting_a_missing_local_path_says_it_is_no_directory_and_no_image_reference(
    target: str,
) -> None:
    result = cache_cli("inspect", target, check=False)

    assert result.returncode == 2
    line = one_line(result)
    assert f"{target!r}: no such directory, and not an image reference" in line
    assert "cache inspect takes a cache directory or an image reference" in line
    assert "host[:port]" not in line


def test_inspecting_a_file_says_inspect_takes_a_cache_directory_or_an_image(
    tmp_path: Path,
) -> None:
    a_file = tmp_path / "summary.json"
    a_file.write_text("{}")

    result = cache_cli("inspect", str(a_file), check=False)

    assert result.returncode == 2
    assert f"{str(a_file)!r} is a file, not a cache directory or an image reference" in (
        one_line(result)
    )


def test_extracting_a_local_directory_says_extract_takes_an_image_reference(
    compiled: Path, tmp_path: Path
) -> None:
    result = cache_cli("extract", str(compiled), "--store", str(tmp_path / "s"), check=False)

    assert result.returncode == 2
    line = one_line(result)
    assert f"{str(compiled)!r} is a directory, not an image reference" in line
    assert "cache extract takes an image reference (REGISTRY/REPOSITORY" in line
    assert not (tmp_path / "s").exists()


def test_inspecting_a_signature_tag_says_it_is_a_signature_and_names_the_signed_image(
    compiled: Path, tmp_path: Path, registry: str
) -> None:
    ref = new_ref(registry)
    digest = build(compiled, ref)
    for signer in ("first", "second"):  # two signatures: two layers in the .sig manifest
        key, _ = write_keys(tmp_path, signer)
        cache_cli("sign", ref, "--key", str(key))
    repository = ref.rsplit(":", 1)[0]
    signature = f"{repository}:{digest.replace(':', '-')}.sig"

    result = cache_cli("inspect", signature, check=False)

    assert result.returncode == 1
    line = one_line(result)
    assert "a cosign signature, not a cache image" in line
    assert line.endswith(f"{repository}@{digest}")
    assert "unpack" not in line


def test_debug_logs_of_an_authenticated_push_and_pull_name_no_credential_token_or_query(
    compiled: Path, tmp_path: Path, test_servers: dict[str, str]
) -> None:
    address, user, password = require(
        test_servers,
        "GPUFLEET_TEST_REGISTRY_AUTH",
        "GPUFLEET_TEST_REGISTRY_AUTH_USER",
        "GPUFLEET_TEST_REGISTRY_AUTH_PASSWORD",
    )
    ref = f"{address}/kcache-cli/logged-{uuid.uuid4().hex[:8]}:v1"
    env = {"REGISTRY_USERNAME": user, "REGISTRY_PASSWORD": password, "LOG_LEVEL": "debug"}
    pushed = cache_cli("build", str(compiled), "-t", ref, env=env)
    pulled = cache_cli(
        "extract", ref, "--store", str(tmp_path / "s"), "--mount-root", "/m", env=env
    )
    logs = pushed.stderr + pulled.stderr

    lines = [json.loads(line) for line in logs.splitlines()]
    requests = [line for line in lines if line["msg"] == "registry request"]
    assert {(r["method"], r["status"]) for r in requests} >= {("POST", 202), ("PUT", 201)}
    assert any("/blobs/uploads/" in r["url"] for r in requests if r["method"] == "PUT")
    assert all("?" not in r["url"] for r in requests)
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    for secret in (
        "_state=",
        "digest=sha256",
        "Authorization",
        "Bearer",
        "Basic ",
        password,
        basic,
    ):
        assert secret not in logs
    for presigned in ("X-Amz-", "Signature=", "Expires=", "token="):
        assert presigned not in logs
    assert "HTTP Request" not in logs  # httpx's own lines, whole URLs and all


def test_at_the_default_level_a_push_and_a_pull_log_no_request_lines(
    compiled: Path, tmp_path: Path, registry: str
) -> None:
    ref = new_ref(registry)
    pushed = cache_cli("build", str(compiled), "-t", ref, env={"LOG_LEVEL": "info"})
    pulled = cache_cli(
        "extract", ref, "--store", str(tmp_path / "s"), "--mount-root", "/m",
        env={"LOG_LEVEL": "info"},
    )  # fmt: skip

    assert pushed.stderr == pulled.stderr == ""


def run_with_stderr_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run ``gpufleet cache ARGS`` with stderr on a pseudo-terminal: (status, stdout, stderr)."""
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "KCACHE_"))}
    env.update({"TERM": "xterm-256color", "COLUMNS": "160", "LOG_LEVEL": "info"})
    env.pop("FORCE_COLOR", None)
    env.pop("NO_COLOR", None)
    with subprocess.Popen(
        [*GPUFLEET, *args], stdout=subprocess.PIPE, stderr=secondary, env=env, text=True
    ) as proc:
        os.close(secondary)
        seen = bytearray()
        while True:
            ready, _, _ = select.select([primary], [], [], 120)  # a hang guard, not a timing
            assert ready, f"no output and no exit; so far: {bytes(seen)!r}"
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal's last descriptor
                break
            if not data:
                break
            seen += data
        os.close(primary)
        assert proc.stdout is not None
        out = proc.stdout.read()
        status = proc.wait(timeout=120)
    return status, out, seen.decode(errors="replace")


def test_build_draws_a_progress_bar_when_stderr_is_a_terminal(
    compiled: Path, registry: str
) -> None:
    ref = new_ref(registry)

    status, out, terminal = run_with_stderr_on_a_terminal("build", str(compiled), "-t", ref)

    assert status == 0, terminal
    assert out.startswith(f"{ref}@sha256:")
    assert f"push {ref}" in terminal
    assert "━" in terminal  # the bar itself


def test_build_draws_no_progress_bar_when_stderr_is_piped(compiled: Path, registry: str) -> None:
    ref = new_ref(registry)

    result = cache_cli("build", str(compiled), "-t", ref, env={"LOG_LEVEL": "info"})

    assert "━" not in result.stderr
    assert f"push {ref}" not in result.stderr
    assert result.stderr == ""


def _copy_repository(registry: str, source: str, target: str, tags: list[str]) -> None:
    """Copy manifests (by tag) and their blobs from one repository to another, as a mirror does."""
    with RegistryClient(registry) as client:
        for tag in tags:
            manifest, media_type, _ = client.get_manifest(source, tag)
            doc = json.loads(manifest)
            for blob in [doc["config"], *doc["layers"]]:
                data = b"".join(client.iter_blob(source, blob["digest"]))
                client.push_blob(target, data, blob["digest"])
            client.push_manifest(target, tag, manifest, media_type)


def test_a_signed_image_copied_to_another_repository_fails_verify_unless_its_origin_is_named(
    tmp_path: Path, registry: str
) -> None:
    key, pub = write_keys(tmp_path, "k")
    origin = f"kcache-cli/origin-{uuid.uuid4().hex[:8]}"
    mirror = f"kcache-cli/mirror-{uuid.uuid4().hex[:8]}"
    config, layer = b'{"config":{}}', b"not a cache: verify reads the manifest only"
    with RegistryClient(registry) as client:
        client.push_blob(origin, config)
        client.push_blob(origin, layer)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256_digest(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": sha256_digest(layer), "size": len(layer)}],
        }).encode()  # fmt: skip
        digest = client.push_manifest(
            origin, "v1", manifest, "application/vnd.oci.image.manifest.v1+json"
        )
    signature = cache_cli("sign", f"{registry}/{origin}:v1", "--key", str(key)).stdout.strip()
    assert signature.startswith("sha256:")
    _copy_repository(registry, origin, mirror, ["v1", digest.replace(":", "-") + ".sig"])

    copied = cache_cli("verify", f"{registry}/{mirror}:v1", "--key", str(pub), check=False)
    assert copied.returncode == 1, copied.stderr
    assert f"names repository '{registry}/{origin}'" in copied.stderr
    assert "Traceback" not in copied.stderr
    named = cache_cli(
        "verify", f"{registry}/{mirror}:v1", "--key", str(pub),
        "--signed-repository", f"{registry}/{origin}",
    )  # fmt: skip
    assert named.stdout.strip() == digest
    assert (
        cache_cli("verify", f"{registry}/{origin}:v1", "--key", str(pub)).stdout.strip() == digest
    )
