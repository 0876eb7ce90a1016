"""X.509 certificates for TLS on loopback and the control plane's own CA (in memory, no I/O).

One self-signed builder (a CA, or a registry token signer that is its own
root) and one leaf builder (server or client authentication), both EC P-256
with SHA-256. Callers write the PEM where they need it (`trustplane.atomic`).
Certificates start an hour in the past so that a slightly slow clock still
accepts them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 825
_BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class KeyAndCertificate:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (write it with mode 0600)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def self_signed(common_name: str, valid_days: int = CA_VALID_DAYS) -> KeyAndCertificate:
    """A new key and a self-signed certificate that may sign certificates (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _validity(x509.CertificateBuilder(), valid_days)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return KeyAndCertificate(key, cert)


def issue_leaf(
    issuer: KeyAndCertificate,
    common_name: str,
    *,
    client: bool = False,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    valid_days: int = LEAF_VALID_DAYS,
) -> KeyAndCertificate:
    """A new key and a certificate `issuer` signs for TLS server (or, with `client`, client) auth.

    Names and addresses go into the subject alternative name (what TLS
    clients match); a client certificate names its owner by common name.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    issuer_ski = issuer.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    builder = (
        _validity(x509.CertificateBuilder(), valid_days)
        .subject_name(_name(common_name))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    san: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    san += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = (
        builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return KeyAndCertificate(key, cert)


def load(key_pem: bytes, certificate_pem: bytes, source: str) -> KeyAndCertificate:
    """An EC key and its certificate from PEM (an issuer read back from disk)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{source} does not hold an EC private key")
    return KeyAndCertificate(key, x509.load_pem_x509_certificate(certificate_pem))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, valid_days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
    )


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
