"""A throw-away certificate authority for the embedded components.

The registry, the token server and the demo speak TLS on 127.0.0.1; they need
a CA whose certificate the clients trust, server certificates whose subject
alternative names match the loopback address, and a key that signs registry
tokens. Everything is made with `cryptography` (EC P-256) and written as PEM,
private keys with mode 0600.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 825
# Certificates start an hour in the past so that a slightly slow clock still accepts them.
_BACKDATE = dt.timedelta(hours=1)


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
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    ca = CertificateAuthority(cert_file=directory / "ca.pem", key_file=directory / "ca-key.pem")
    _write_key(ca.key_file, key)
    _write_public(ca.cert_file, cert.public_bytes(serialization.Encoding.PEM))
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
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _load_ec_key(ca.key_file)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    common_name = dns_names[0] if dns_names else ip_addresses[0]
    san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    san += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    result = ServerCertificate(
        cert_file=directory / f"{name}.pem",
        key_file=directory / f"{name}-key.pem",
        ca_file=ca.cert_file,
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ip_addresses),
    )
    _write_key(result.key_file, key)
    _write_public(result.cert_file, cert.public_bytes(serialization.Encoding.PEM))
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
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _load_ec_key(ca.key_file)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cn = common_name if common_name is not None else name
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    result = ClientCertificate(
        cert_file=directory / f"{name}.pem",
        key_file=directory / f"{name}-key.pem",
        ca_file=ca.cert_file,
        common_name=cn,
    )
    _write_key(result.key_file, key)
    _write_public(result.cert_file, cert.public_bytes(serialization.Encoding.PEM))
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
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    signer = TokenSigningKey(
        cert_file=directory / f"{name}.pem",
        key_file=directory / f"{name}-key.pem",
        key_id=libtrust_key_id(key.public_key()),
    )
    _write_key(signer.key_file, key)
    _write_public(signer.cert_file, cert.public_bytes(serialization.Encoding.PEM))
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


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{path} does not hold an EC private key")
    return key


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a PKCS#8 PEM key, created with mode 0600 so it is never readable by others."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.chmod(0o600)  # O_CREAT's mode does not apply to a file left by an earlier run
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
