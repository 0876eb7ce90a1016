"""A throw-away certificate authority for the embedded components.

The registry, the token server and the demo speak TLS on 127.0.0.1; they need
a CA whose certificate the clients trust, server certificates whose subject
alternative names match the loopback address, and a key that signs registry
tokens. The certificates are built by crypto/certificates.py (the control
plane's own CA uses the same builders) and written here as PEM, atomically,
private keys with mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.atomic import atomic_write
from trustplane.crypto.certificates import (
    CA_VALID_DAYS,
    LEAF_VALID_DAYS,
    KeyAndCertificate,
    issue_leaf,
    load,
    self_signed,
)


@dataclass(frozen=True)
class CertificateAuthority:
    """PEM paths of a CA certificate and its private key."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class ServerCertificate:
    """PEM paths of a server certificate, its key and the CA that issued it."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]


@dataclass(frozen=True)
class TokenSigningKey:
    """A key that signs registry bearer tokens and its self-signed certificate.

    `cert_file` is what the registry's `auth.token.rootcertbundle` names;
    `key_id` is the libtrust fingerprint the registry accepts as JWT `kid`.
    """

    cert_file: Path
    key_file: Path
    key_id: str


def create_ca(
    directory: Path, common_name: str = "trustplane test CA", *, valid_days: int = CA_VALID_DAYS
) -> CertificateAuthority:
    """Create a self-signed EC P-256 CA in `directory` (ca.pem, ca-key.pem)."""
    ca = CertificateAuthority(cert_file=directory / "ca.pem", key_file=directory / "ca-key.pem")
    _write(directory, ca.cert_file, ca.key_file, self_signed(common_name, valid_days))
    return ca


def issue_server_cert(
    ca: CertificateAuthority,
    directory: Path,
    name: str,
    *,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    valid_days: int = LEAF_VALID_DAYS,
) -> ServerCertificate:
    """Issue a TLS server certificate for the given DNS names and IP addresses.

    Writes NAME.pem and NAME-key.pem into `directory`. The first DNS name (or
    else the first address) becomes the common name; clients match the SAN.
    """
    if not dns_names and not ip_addresses:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    issued = issue_leaf(
        _load_ca(ca),
        dns_names[0] if dns_names else ip_addresses[0],
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        valid_days=valid_days,
    )
    result = ServerCertificate(
        cert_file=directory / f"{name}.pem",
        key_file=directory / f"{name}-key.pem",
        ca_file=ca.cert_file,
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ip_addresses),
    )
    _write(directory, result.cert_file, result.key_file, issued)
    return result


@dataclass(frozen=True)
class ClientCertificate:
    """PEM paths of a TLS client certificate, its key and the CA that issued it."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    common_name: str


def issue_client_cert(
    ca: CertificateAuthority,
    directory: Path,
    name: str,
    *,
    common_name: str | None = None,
    valid_days: int = LEAF_VALID_DAYS,
) -> ClientCertificate:
    """Issue a TLS client certificate (extended key usage clientAuth) for mutual TLS.

    Writes NAME.pem and NAME-key.pem into `directory`. Servers that map a
    certificate to an identity (the KMIP server uses the common name as the
    owner of the keys it creates) see `common_name`, which defaults to `name`.
    """
    cn = common_name if common_name is not None else name
    issued = issue_leaf(_load_ca(ca), cn, client=True, valid_days=valid_days)
    result = ClientCertificate(
        cert_file=directory / f"{name}.pem",
        key_file=directory / f"{name}-key.pem",
        ca_file=ca.cert_file,
        common_name=cn,
    )
    _write(directory, result.cert_file, result.key_file, issued)
    return result


def create_token_signing_key(
    directory: Path,
    name: str = "token-signer",
    *,
    common_name: str = "trustplane token issuer",
    valid_days: int = CA_VALID_DAYS,
) -> TokenSigningKey:
    """Create an EC P-256 key and a self-signed certificate for signing registry tokens (ES256).

    The certificate is its own root, so the registry trusts tokens whose
    header carries either `kid` = `key_id` or `x5c` = [this certificate].
    """
    issued = self_signed(common_name, valid_days)
    signer = TokenSigningKey(
        cert_file=directory / f"{name}.pem",
        key_file=directory / f"{name}-key.pem",
        key_id=libtrust_key_id(issued.key.public_key()),
    )
    _write(directory, signer.cert_file, signer.key_file, issued)
    return signer


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key id docker-registry computes for a trusted key (libtrust fingerprint).

    SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32 without
    padding, in colon-separated groups of four: "ABCD:EFGH:...". The registry
    looks a JWT `kid` up in a table keyed by this value.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def certificate_der_b64(cert_file: Path) -> str:
    """Standard base64 of the DER certificate in `cert_file`, as a JWS `x5c` entry wants it."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")


def _load_ca(ca: CertificateAuthority) -> KeyAndCertificate:
    return load(ca.key_file.read_bytes(), ca.cert_file.read_bytes(), str(ca.key_file))


def _write(directory: Path, cert_file: Path, key_file: Path, issued: KeyAndCertificate) -> None:
    """The key (mode 0600 from its first byte), then its certificate, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(key_file, issued.key_pem(), mode=0o600)
    atomic_write(cert_file, issued.certificate_pem())
