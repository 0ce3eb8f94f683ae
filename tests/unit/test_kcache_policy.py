"""The trust Secret read into a `TrustPolicy`: keys by name, who needs which, clear errors."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gpufleet.core.errors import ConfigError
from gpufleet.kcache.errors import TrustPolicyError
from gpufleet.kcache.policy import TrustPolicy, check_signature_format


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pems() -> dict[str, bytes]:
    return {name: _pem(ec.generate_private_key(ec.SECP256R1())) for name in ("a", "b", "rel")}


POLICY = b"""
cluster: [rel]
namespaces:
  team-a: [a, rel]
  "*": [b]
  team-open: []
"""


def test_keys_are_named_after_their_data_keys_and_per_scope(pems: dict[str, bytes]) -> None:
    data = {f"{n}.pub": pem for n, pem in pems.items()} | {"policy.yaml": POLICY}
    policy = TrustPolicy.from_secret_data(data)
    assert sorted(policy.keys) == ["a", "b", "rel"]
    assert list(policy.keys_for(None)) == ["rel"]
    assert list(policy.keys_for("team-a")) == ["a", "rel"]
    assert policy.keys_for("team-a")["a"].public_numbers() == (
        serialization.load_pem_public_key(pems["a"]).public_numbers()  # type: ignore[union-attr]
    )


def test_a_namespace_without_an_entry_gets_the_wildcards_keys(pems: dict[str, bytes]) -> None:
    data = {f"{n}.pub": pem for n, pem in pems.items()} | {"policy.yaml": POLICY}
    policy = TrustPolicy.from_secret_data(data)
    assert list(policy.keys_for("team-z")) == ["b"]
    assert policy.required("team-z")


def test_a_namespaces_own_entry_replaces_the_wildcard(pems: dict[str, bytes]) -> None:
    data = {f"{n}.pub": pem for n, pem in pems.items()} | {"policy.yaml": POLICY}
    policy = TrustPolicy.from_secret_data(data)
    assert "b" not in policy.keys_for("team-a")
    assert not policy.required("team-open")
    assert policy.keys_for("team-open") == {}


def test_cluster_caches_need_a_signature_only_when_cluster_names_a_key(
    pems: dict[str, bytes],
) -> None:
    data = {"a.pub": pems["a"], "policy.yaml": b"namespaces: {team-a: [a]}"}
    policy = TrustPolicy.from_secret_data(data)
    assert not policy.required(None)
    assert policy.required("team-a")
    assert not policy.required("team-b")


def test_nothing_at_all_requires_nothing() -> None:
    policy = TrustPolicy.from_secret_data({})
    assert not policy.required(None)
    assert not policy.required("team-a")
    assert TrustPolicy() == policy


def test_keys_without_a_policy_are_trusted_and_required_everywhere(
    pems: dict[str, bytes],
) -> None:
    policy = TrustPolicy.from_secret_data({"a.pub": pems["a"], "b.pub": pems["b"]})
    for scope in (None, "team-a", "anything"):
        assert policy.required(scope)
        assert list(policy.keys_for(scope)) == ["a", "b"]


def test_an_empty_policy_yaml_requires_nothing(pems: dict[str, bytes]) -> None:
    policy = TrustPolicy.from_secret_data({"a.pub": pems["a"], "policy.yaml": b"\n"})
    assert not policy.required(None)
    assert not policy.required("team-a")


def test_other_data_keys_are_ignored(pems: dict[str, bytes]) -> None:
    policy = TrustPolicy.from_secret_data({"a.pub": pems["a"], "README": b"\xff not a key"})
    assert list(policy.keys) == ["a"]


@pytest.mark.parametrize(
    ("document", "says"),
    [
        (b"cluster: [a\n", r"'policy.yaml': not valid YAML at line 2"),
        (b"- a\n- b\n", r"'policy.yaml': must be a mapping with cluster and/or namespaces"),
        (b"clusters: [a]\n", r"unknown field\(s\) clusters"),
        (b"cluster: a\n", r"cluster: must be a list of key names"),
        (b"cluster: [ghost]\n", r"cluster: names key\(s\) 'ghost' that the Secret has no \.pub"),
        (b"namespaces: [a]\n", r"namespaces must map a namespace"),
        (b"namespaces: {team-a: [a, 7]}\n", r"namespaces\.team-a: must be a list of key names"),
        (b"namespaces: {7: [a]}\n", r"namespace 7 is not a name"),
        (b"\xff\xfe", r"not UTF-8"),
    ],
    ids=[
        "yaml", "list", "unknown", "not-a-list", "missing-key", "namespaces-list",
        "not-a-name", "int-namespace", "binary",
    ],
)  # fmt: skip
def test_a_malformed_policy_is_a_config_error_naming_the_secret_key(
    pems: dict[str, bytes], document: bytes, says: str
) -> None:
    data = {"a.pub": pems["a"], "policy.yaml": document}
    with pytest.raises(TrustPolicyError, match=says) as refused:
        TrustPolicy.from_secret_data(data, source="Secret kcache/trust")
    assert isinstance(refused.value, ConfigError)
    assert str(refused.value).startswith("Secret kcache/trust, data key 'policy.yaml'")


def test_a_huge_policy_is_refused_unparsed(pems: dict[str, bytes]) -> None:
    data = {"a.pub": pems["a"], "policy.yaml": b"#" * (1 << 20)}
    with pytest.raises(TrustPolicyError, match="larger than"):
        TrustPolicy.from_secret_data(data)


def test_a_public_key_that_is_not_p256_is_refused_naming_its_data_key() -> None:
    rsa_pem = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(TrustPolicyError, match=r"data key 'ci\.pub': an RSA 2048-bit key"):
        TrustPolicy.from_secret_data({"ci.pub": rsa_pem})


def test_a_private_key_in_a_pub_entry_is_refused_without_showing_it() -> None:
    private = _private_pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(TrustPolicyError, match=r"data key 'ci\.pub' holds a private key") as bad:
        TrustPolicy.from_secret_data({"ci.pub": private})
    body = private.decode().splitlines()[1]
    assert body[:20] not in str(bad.value)


def test_garbage_in_a_pub_entry_is_refused_naming_it() -> None:
    with pytest.raises(TrustPolicyError, match=r"data key 'ci\.pub': not a PEM or DER public key"):
        TrustPolicy.from_secret_data({"ci.pub": b"hello"})


def test_a_pub_entry_with_no_name_is_refused(pems: dict[str, bytes]) -> None:
    with pytest.raises(TrustPolicyError, match=r"data key '\.pub' names no key"):
        TrustPolicy.from_secret_data({".pub": pems["a"]})


def test_signature_formats_are_the_two_cosign_ones() -> None:
    assert check_signature_format(None, "label") is None
    assert check_signature_format("cosign-v3", "label") == "cosign-v3"
    with pytest.raises(TrustPolicyError, match=r"label: 'cosign-v4' is no signature format"):
        check_signature_format("cosign-v4", "label")
