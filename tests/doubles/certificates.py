"""Self-signed certificates for the test servers: HTTPS listeners and token signers.

One `self_signed` builds every certificate the tests need: an ECDSA P-256 key
and a certificate over it that is its own CA (``BasicConstraints(ca=True)``),
valid from an hour ago for a day, naming each of ``hosts`` in its
subjectAltName (IP addresses as IP entries, the rest as DNS names). Trusting
the certificate file is then all a client needs: Python's ``ssl`` with
``cafile=``, httpx through ``SSL_CERT_FILE``, docker-registry through a
``rootcertbundle``.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["SelfSigned", "self_signed"]


@dataclass(frozen=True)
class SelfSigned:
    """A private key and the self-signed certificate over its public key."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def certificate_pem(self) -> bytes:
        """The certificate in PEM, what a client is told to trust."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key in unencrypted PKCS#8 PEM, what a server loads."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> tuple[Path, Path]:
        """Write the certificate and the key in PEM; returns (cert_path, key_path)."""
        cert_path.write_bytes(self.certificate_pem())
        key_path.write_bytes(self.key_pem())
        return cert_path, key_path

    def server_context(self, cert_path: Path, key_path: Path) -> ssl.SSLContext:
        """A TLS server context presenting this certificate (written to the two paths)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self.write(cert_path, key_path))
        return context


def self_signed(
    common_name: str,
    *,
    hosts: Iterable[str] = (),
    key: ec.EllipticCurvePrivateKey | None = None,
) -> SelfSigned:
    """A certificate for `common_name`, valid for `hosts`, signed by `key` (a new one if None)."""
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    names = [_general_name(host) for host in hosts]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return SelfSigned(key, builder.sign(key, hashes.SHA256()))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
