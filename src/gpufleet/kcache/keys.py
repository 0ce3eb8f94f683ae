"""Signing keys: load cosign-compatible EC P-256 private and public keys, and check them.

PEM (PKCS#8, SEC1, SubjectPublicKeyInfo) or DER files, the private key
optionally encrypted with the password cosign reads from ``COSIGN_PASSWORD``.
Anything but an EC P-256 key is refused with `SigningKeyError` naming the kind
of key found. Signing and verifying with the keys is `kcache.sign`'s job; see
docs/kcache-sign.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gpufleet.kcache.errors import KcacheError

__all__ = [
    "COSIGN_PASSWORD_ENV",
    "SigningKeyError",
    "is_p256",
    "load_private_key",
    "load_public_key",
    "not_p256_error",
    "parse_public_key",
    "password_from_env",
]

COSIGN_PASSWORD_ENV = "COSIGN_PASSWORD"

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_COSIGN_KEY_TYPES = (b"ENCRYPTED SIGSTORE PRIVATE KEY", b"ENCRYPTED COSIGN PRIVATE KEY")
_P256_ONLY = "cosign's key-based signatures here use EC P-256 (prime256v1) keys only"


class SigningKeyError(KcacheError):
    """A key file is unreadable, of an unsupported kind, or its password is wrong."""


def password_from_env(environ: Mapping[str, str]) -> bytes | None:
    """The private key password from ``COSIGN_PASSWORD`` (cosign's variable), if set."""
    value = environ.get(COSIGN_PASSWORD_ENV)
    return None if value is None else value.encode()


def load_private_key(path: Path, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """An EC P-256 private key from a PEM (PKCS#8 or SEC1, optionally encrypted) or DER file.

    ``password`` is used only when the key is encrypted. cosign's own
    ``ENCRYPTED SIGSTORE PRIVATE KEY`` files are refused with a way out: their
    NaCl secretbox encryption is beyond the ``cryptography`` library.
    """
    data = _read_key(path)
    pem_type = _pem_type(data)
    if pem_type in _COSIGN_KEY_TYPES:
        raise SigningKeyError(
            f"{path}: cosign's encrypted key format (scrypt + NaCl secretbox) is not supported; "
            "sign with a PEM EC P-256 key instead: `openssl genpkey -algorithm EC "
            "-pkeyopt ec_paramgen_curve:P-256 -out kcache.key` (add -aes256 to protect it "
            f"with a password, passed in {COSIGN_PASSWORD_ENV}), publish `openssl pkey -in "
            "kcache.key -pubout -out kcache.pub`, and `cosign import-key-pair --key "
            "kcache.key` if cosign should sign with the same key"
        )
    if pem_type is not None and pem_type.endswith(b"PUBLIC KEY"):
        raise SigningKeyError(f"{path} holds a public key; signing needs the private key")
    load = (
        serialization.load_der_private_key
        if pem_type is None
        else serialization.load_pem_private_key
    )
    try:
        key: Any = load(data, password=None)
    except TypeError:
        # Encrypted: only now is a password needed (COSIGN_PASSWORD may be set for
        # another key, so a password given for a plain key is not an error).
        if not password:
            raise SigningKeyError(
                f"{path} is encrypted and no password was given (set {COSIGN_PASSWORD_ENV})"
            ) from None
        try:
            key = load(data, password=password)
        except ValueError:
            raise SigningKeyError(f"{path}: wrong password (or a damaged key)") from None
    except ValueError as exc:
        raise SigningKeyError(f"{path}: not a PEM or DER private key: {exc}") from None
    except UnsupportedAlgorithm as exc:
        raise SigningKeyError(f"{path}: unsupported key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not is_p256(key):
        raise not_p256_error(key, str(path))
    return key


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """An EC P-256 public key from a PEM (``cosign.pub``: SubjectPublicKeyInfo) or DER file."""
    return parse_public_key(_read_key(path), str(path))


def parse_public_key(data: bytes, what: str) -> ec.EllipticCurvePublicKey:
    """An EC P-256 public key from PEM or DER ``data``; errors name ``what``, never the bytes."""
    pem_type = _pem_type(data)
    if pem_type is not None and pem_type.endswith(b"PRIVATE KEY"):
        raise SigningKeyError(f"{what} holds a private key; verifying needs the public key")
    try:
        key: Any = (
            serialization.load_der_public_key(data)
            if pem_type is None
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{what}: not a PEM or DER public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not is_p256(key):
        raise not_p256_error(key, what)
    return key


def _read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read key: {exc.strerror}") from None


def _pem_type(data: bytes) -> bytes | None:
    match = _PEM_BEGIN.search(data)
    return match.group(1) if match else None


def not_p256_error(key: object, what: str) -> SigningKeyError:
    """The error for ``what`` (a key file, or which key) being ``key`` and not EC P-256."""
    return SigningKeyError(f"{what}: {_describe(key)}; {_P256_ONLY}")


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"an RSA {key.key_size}-bit key"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    return f"a {type(key).__name__}"


def is_p256(key: object) -> bool:
    """Whether ``key`` is an EC P-256 (prime256v1) key, private or public."""
    return isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1
    )
