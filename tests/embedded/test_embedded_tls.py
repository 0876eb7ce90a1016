"""The test CA issues certificates that verify, and keys only their owner can read."""

from __future__ import annotations

import ipaddress
import re
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.embedded.tls import (
    create_ca,
    create_token_signing_key,
    issue_client_cert,
    issue_server_cert,
    libtrust_key_id,
)


def test_server_cert_chains_to_ca_with_sans(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca")
    server = issue_server_cert(
        ca,
        tmp_path / "srv",
        "web",
        dns_names=("localhost", "reg.test"),
        ip_addresses=("127.0.0.1",),
    )
    ca_cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    cert = x509.load_pem_x509_certificate(server.cert_file.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "reg.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc).days >= 3650
    assert server.ca_file == ca.cert_file


def test_private_keys_are_mode_0600(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    server = issue_server_cert(ca, tmp_path, "srv")
    signer = create_token_signing_key(tmp_path)
    for key in (ca.key_file, server.key_file, signer.key_file):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_token_signing_key_id_is_libtrust_fingerprint(tmp_path: Path) -> None:
    signer = create_token_signing_key(tmp_path)
    cert = x509.load_pem_x509_certificate(signer.cert_file.read_bytes())
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert signer.key_id == libtrust_key_id(public)
    assert re.fullmatch(r"[A-Z2-7]{4}(:[A-Z2-7]{4}){11}", signer.key_id)


def test_client_cert_is_for_client_auth_with_its_common_name(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca")
    client = issue_client_cert(ca, tmp_path / "cli", "kms", common_name="trustplane-kms")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    cert = x509.load_pem_x509_certificate(client.cert_file.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    common_name = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    assert common_name[0].value == client.common_name == "trustplane-kms"
    assert stat.S_IMODE(client.key_file.stat().st_mode) == 0o600
    assert client.ca_file == ca.cert_file
