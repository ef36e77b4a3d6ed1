"""A test PKI: a CA, and server and client certificates it signs, as PEM files.

The directory layout is QEMU's ``tls-creds-x509`` (``ca-cert.pem``,
``server-cert.pem``, ``server-key.pem``), which SPICE's ``x509-dir`` shares.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"
_DAY = datetime.timedelta(days=1)

Pair = tuple[x509.Certificate, Any]


def make_cert(name: str, issuer: Pair | None, *, ca: bool = False, client: bool = False) -> Pair:
    """An EC P-256 certificate for ``name``, self-signed when ``issuer`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "consoled tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + _DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
    else:
        purpose = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256()), key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


@dataclass(frozen=True)
class Pki:
    """Paths of one test PKI; ``dir`` is what QEMU's tls-creds-x509 reads."""

    dir: str
    ca_cert: str
    client_cert: str
    client_key: str


def make_pki(path: str, *, ca: Pair | None = None) -> Pki:
    """A CA (new unless given), a server and a client certificate, written under ``path``."""
    os.makedirs(path, exist_ok=True)
    ca = ca or make_cert("consoled test CA", None, ca=True)
    server = make_cert("localhost", ca)
    client = make_cert("consoled", ca, client=True)
    _write(os.path.join(path, "server-cert.pem"), cert_pem(server[0]))
    _write(os.path.join(path, "server-key.pem"), key_pem(server[1]))
    return Pki(
        dir=path,
        ca_cert=_write(os.path.join(path, "ca-cert.pem"), cert_pem(ca[0])),
        client_cert=_write(os.path.join(path, "client-cert.pem"), cert_pem(client[0])),
        client_key=_write(os.path.join(path, "client-key.pem"), key_pem(client[1])),
    )
