"""The S3 exporter against a real S3 API: moto's server, started by scripts/servers/s3.sh."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import boto3.session
import pytest

from gpufleet.core.config import load_settings
from gpufleet.core.errors import ConfigError
from gpufleet.inventory.errors import ExporterError, PermanentExporterError
from gpufleet.inventory.exporters.s3 import S3Exporter, S3Settings, object_key
from gpufleet.inventory.reading import Reading, batch_hash
from tests.conftest import require

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 24, 0, 16, 10, 123456, tzinfo=UTC)


def reading(node: str = "node-1", index: int = 0, cluster: str = "c1") -> Reading:
    return Reading(
        cluster=cluster, node=node, machine=f"i-{node}", source="nvml", chassis="",
        gpu=f"SN-{node}-{index}", read_time=T0, uuid=f"GPU-{node}-{index}",
        model="NVIDIA H100 80GB HBM3", pci_bus_id=f"00000000:{index:02x}:00.0", index=index,
    )  # fmt: skip


BATCH = [reading(index=i) for i in range(4)]


@pytest.fixture
def endpoint(test_servers: dict[str, str], aws_env: None) -> str:
    """The URL of the moto server."""
    (url,) = require(test_servers, "GPUFLEET_TEST_S3_ENDPOINT")
    return url


@pytest.fixture
def admin(endpoint: str) -> Iterator[S3Client]:
    """A plain boto3 client to create buckets and inspect what the exporter wrote."""
    client = boto3.session.Session().client("s3", endpoint_url=endpoint)
    yield client
    client.close()


@pytest.fixture
def bucket(admin: S3Client) -> str:
    name = f"inv-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=name)
    return name


def settings(bucket: str, endpoint: str, **overrides: Any) -> S3Settings:
    return load_settings(S3Settings, s3_bucket=bucket, s3_endpoint_url=endpoint, **overrides)


async def write(exporter: S3Exporter, batch: list[Reading]) -> None:
    try:
        await exporter.write(batch)
    finally:
        await exporter.close()


def keys(admin: S3Client, bucket: str) -> list[str]:
    listing = admin.list_objects_v2(Bucket=bucket)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_object_key_follows_the_partition_pattern_for_the_first_read_time(
    endpoint: str, admin: S3Client, bucket: str
) -> None:
    await write(S3Exporter(settings(bucket, endpoint, s3_prefix="/inventory/")), BATCH)
    expected = (
        "inventory/year=2026/month=11/day=24/hour=00/cluster=c1/node=node-1/"
        f"20261124T001610.123Z-{batch_hash(BATCH)[:16]}.json"
    )
    assert keys(admin, bucket) == [expected]


async def test_custom_partition_pattern_shapes_the_key(
    endpoint: str, admin: S3Client, bucket: str
) -> None:
    exporter = S3Exporter(settings(bucket, endpoint, s3_partition_pattern="dt=%Y-%m-%d"))
    await write(exporter, BATCH)
    assert keys(admin, bucket)[0].startswith("dt=2026-11-24/cluster=c1/node=node-1/")


async def test_replaying_a_batch_overwrites_the_same_keys_and_adds_no_object(
    endpoint: str, admin: S3Client, bucket: str
) -> None:
    multi = [*BATCH, reading(node="node-2")]
    await write(S3Exporter(settings(bucket, endpoint)), multi)
    first = keys(admin, bucket)
    await write(S3Exporter(settings(bucket, endpoint)), multi)
    assert keys(admin, bucket) == first


async def test_object_body_is_json_lines_of_the_readings(
    endpoint: str, admin: S3Client, bucket: str
) -> None:
    await write(S3Exporter(settings(bucket, endpoint)), BATCH)
    body = admin.get_object(Bucket=bucket, Key=keys(admin, bucket)[0])["Body"].read()
    assert [json.loads(line) for line in body.splitlines()] == [r.to_dict() for r in BATCH]


async def test_gzip_object_gunzips_to_the_same_json_lines(
    endpoint: str, admin: S3Client, bucket: str
) -> None:
    await write(S3Exporter(settings(bucket, endpoint, s3_compress="gzip")), BATCH)
    body = admin.get_object(Bucket=bucket, Key=keys(admin, bucket)[0])["Body"].read()
    lines = gzip.decompress(body).decode().splitlines()
    assert [json.loads(line) for line in lines] == [r.to_dict() for r in BATCH]


async def test_gzip_object_has_gz_key_and_gzip_content_encoding(
    endpoint: str, admin: S3Client, bucket: str
) -> None:
    await write(S3Exporter(settings(bucket, endpoint, s3_compress="gzip")), BATCH)
    (key,) = keys(admin, bucket)
    head = admin.head_object(Bucket=bucket, Key=key)
    assert (key.endswith(".json.gz"), head.get("ContentEncoding")) == (True, "gzip")


async def test_multi_node_batch_is_split_into_one_object_per_node(
    endpoint: str, admin: S3Client, bucket: str
) -> None:
    mixed = [reading("node-a", 0), reading("node-b", 0), reading("node-a", 1),
             reading("node-a", 0, cluster="c2")]  # fmt: skip
    await write(S3Exporter(settings(bucket, endpoint)), mixed)
    groups = {key.split("/")[4] + "/" + key.split("/")[5] for key in keys(admin, bucket)}
    assert groups == {"cluster=c1/node=node-a", "cluster=c1/node=node-b", "cluster=c2/node=node-a"}


async def test_each_node_object_is_keyed_by_the_hash_of_its_own_readings(
    endpoint: str, admin: S3Client, bucket: str
) -> None:
    node_a = [reading("node-a", 0), reading("node-a", 1)]
    node_b = [reading("node-b", 0)]
    await write(S3Exporter(settings(bucket, endpoint)), [node_a[0], node_b[0], node_a[1]])
    hashes = {key.rsplit("-", 1)[1].removesuffix(".json") for key in keys(admin, bucket)}
    assert hashes == {batch_hash(node_a)[:16], batch_hash(node_b)[:16]}


async def test_force_path_style_keeps_the_endpoint_host_and_puts_the_bucket_in_the_path(
    endpoint: str, admin: S3Client, bucket: str
) -> None:
    # A host name rather than the IP, as an on-prem endpoint would be.
    host_endpoint = endpoint.replace("127.0.0.1", "localhost")
    exporter = S3Exporter(settings(bucket, host_endpoint, s3_force_path_style=True))
    urls: list[str] = []
    exporter.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: urls.append(request.url)
    )
    await write(exporter, BATCH)
    sent = urlsplit(urls[0])
    assert (sent.netloc, sent.path.startswith(f"/{bucket}/")) == (
        urlsplit(host_endpoint).netloc,
        True,
    )


class RequestStopped(Exception):
    """Raised by a before-send hook, so a test sees the URL without any network."""


def stop_before_send(exporter: S3Exporter) -> list[str]:
    urls: list[str] = []

    def record(request: Any, **_: Any) -> None:
        urls.append(request.url)
        raise RequestStopped

    exporter.client.meta.events.register("before-send.s3.PutObject", record)
    return urls


@pytest.mark.usefixtures("aws_env")
async def test_force_path_style_on_aws_puts_the_bucket_in_the_path() -> None:
    exporter = S3Exporter(load_settings(S3Settings, s3_bucket="inv-b", s3_force_path_style=True))
    urls = stop_before_send(exporter)
    with pytest.raises(RequestStopped):
        await write(exporter, BATCH)
    assert urls[0].startswith("https://s3.amazonaws.com/inv-b/")


@pytest.mark.usefixtures("aws_env")
async def test_without_force_path_style_aws_addresses_the_bucket_as_a_virtual_host() -> None:
    exporter = S3Exporter(load_settings(S3Settings, s3_bucket="inv-b"))
    urls = stop_before_send(exporter)
    with pytest.raises(RequestStopped):
        await write(exporter, BATCH)
    assert urls[0].startswith("https://inv-b.s3.amazonaws.com/")


async def test_health_passes_for_an_existing_bucket(endpoint: str, bucket: str) -> None:
    exporter = S3Exporter(settings(bucket, endpoint))
    await exporter.health()
    await exporter.close()


async def test_health_of_a_missing_bucket_names_the_bucket_and_endpoint(endpoint: str) -> None:
    exporter = S3Exporter(settings("no-such-bucket-here", endpoint))
    with pytest.raises(ExporterError) as caught:
        await exporter.health()
    await exporter.close()
    assert str(caught.value) == (
        f"exporter s3: bucket 'no-such-bucket-here' does not exist at {endpoint}"
    )


async def test_write_to_a_missing_bucket_is_a_retryable_config_error(endpoint: str) -> None:
    exporter = S3Exporter(settings("no-such-bucket-here", endpoint))
    with pytest.raises(ExporterError) as caught:
        await write(exporter, BATCH)
    error = caught.value
    assert (error.error_type, isinstance(error, PermanentExporterError)) == ("config", False)


async def test_write_error_names_the_bucket_key_and_endpoint(endpoint: str) -> None:
    exporter = S3Exporter(settings("no-such-bucket-here", endpoint))
    key = object_key(exporter.settings, BATCH)
    with pytest.raises(ExporterError) as caught:
        await write(exporter, BATCH)
    assert f"cannot put s3://no-such-bucket-here/{key} at {endpoint}: NoSuchBucket" in str(
        caught.value
    )


async def test_unreachable_endpoint_is_a_connection_error(endpoint: str) -> None:
    exporter = S3Exporter(settings("any-bucket", f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ExporterError) as caught:
        await write(exporter, BATCH)
    assert caught.value.error_type == "connection"


async def test_a_dropped_connection_fails_after_one_attempt_without_retries(
    endpoint: str,
) -> None:
    # A server that accepts and hangs up at once. botocore would retry that
    # (several connections); the delivery pipeline retries instead, with its
    # own backoff and metrics, so the exporter makes exactly one attempt.
    accepted = 0
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        port = listener.getsockname()[1]

        async def hang_up() -> None:
            nonlocal accepted
            loop = asyncio.get_running_loop()
            while True:
                conn, _ = await loop.sock_accept(listener)
                accepted += 1
                conn.close()

        server = asyncio.create_task(hang_up())
        exporter = S3Exporter(settings("any-bucket", f"http://127.0.0.1:{port}"))
        try:
            with pytest.raises(ExporterError) as caught:
                await exporter.health()
        finally:
            await exporter.close()
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
    assert caught.value.error_type == "connection"
    assert accepted == 1


def test_partition_pattern_with_dot_dot_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^invalid S3_PARTITION_PATTERN='\.\./%Y'"):
        load_settings(S3Settings, s3_bucket="b", s3_partition_pattern="../%Y")


def test_partition_pattern_with_leading_slash_is_refused() -> None:
    with pytest.raises(ConfigError, match="S3_PARTITION_PATTERN"):
        load_settings(S3Settings, s3_bucket="b", s3_partition_pattern="/year=%Y")


def test_missing_bucket_setting_is_refused_naming_s3_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("S3_BUCKET", raising=False)
    with pytest.raises(ConfigError, match=r"^missing required S3_BUCKET$"):
        load_settings(S3Settings)


def test_prefix_slashes_are_stripped() -> None:
    assert load_settings(S3Settings, s3_bucket="b", s3_prefix="//a/b//").s3_prefix == "a/b"


def test_cluster_name_with_a_slash_stays_one_key_segment() -> None:
    odd = [replace(reading(), cluster="team/a")]
    key = object_key(load_settings(S3Settings, s3_bucket="b"), odd)
    assert "/cluster=team%2Fa/node=node-1/" in key
