"""EK certificates against the configured vendor CAs.

A swtpm manufactured by swtpm_setup carries an RSA EK certificate issued by
a local CA (the stand-in for a TPM vendor). The control plane is configured
with that CA (`attestation.ek_ca_files`): the TPM with the certificate
enrols; a TPM without one, or a certificate presented for another EK, is
refused, and the refusal is in the log.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator

import pytest
from conftest import component_missing, start_control_plane_or_fail
from control_helpers import entries_since, log_size
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk

from trustplane.agent.tpm import Identity, Tpm
from trustplane.api.attestation import Activation, Challenge, Enrollment
from trustplane.client import ControlClient
from trustplane.crypto.keys import generate_key_pair
from trustplane.crypto.node_assertion import make_node_assertion
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.swtpm import RunningSwtpm, start_swtpm
from trustplane.errors import IntegrityError, TrustplaneError


@pytest.fixture(scope="module")
def vendor_tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSwtpm]:
    try:
        tpm = start_swtpm(tmp_path_factory.mktemp("swtpm-ekcert"), ek_certificate=True)
    except TrustplaneError as exc:
        component_missing("swtpm with swtpm_setup", str(exc))
    with tpm:
        yield tpm


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory, vendor_tpm: RunningSwtpm
) -> Iterator[RunningControlPlane]:
    assert vendor_tpm.ek_ca_file is not None
    server = start_control_plane_or_fail(
        tmp_path_factory.mktemp("attestation-ekcert"),
        env={"TRUSTPLANE_ATTESTATION__EK_CA_FILES": json.dumps([str(vendor_tpm.ek_ca_file)])},
    )
    yield server
    server.stop()


def node_client(plane: RunningControlPlane) -> tuple[str, ControlClient]:
    name = f"ek-{os.urandom(3).hex()}"
    signing = ec.generate_private_key(ec.SECP256R1())
    with plane.admin() as admin:
        admin.register_node(name, "host", jwk.JWK.from_pyca(signing).export_to_pem().decode())
    client = plane.client()
    client.login_node(
        name, make_node_assertion(jwk.JWK.from_pyca(signing), name, plane.url + "/v1/auth/token")
    )
    return name, client


def enroll(client: ControlClient, ident: Identity, cert: bytes | None) -> Challenge:
    return client.enroll(
        Enrollment(
            ek_public=base64.b64encode(ident.ek_public).decode(),
            ek_certificate=base64.b64encode(cert).decode() if cert else None,
            ak_public=base64.b64encode(ident.ak_public).decode(),
            ak_name=base64.b64encode(ident.ak_name).decode(),
        )
    )


def test_the_vendor_certified_tpm_enrols_and_activates(
    plane: RunningControlPlane, vendor_tpm: RunningSwtpm
) -> None:
    name, client = node_client(plane)
    start = log_size(plane)
    with client, Tpm(vendor_tpm.tcti) as device:
        ident = device.identity()
        assert ident.ek_cert is not None
        cert = x509.load_der_x509_certificate(ident.ek_cert)
        assert cert.issuer.rfc4514_string() == "CN=swtpm-localca"
        challenge = enroll(client, ident, ident.ek_cert)
        secret = device.activate_credential(
            base64.b64decode(challenge.credential_blob),
            base64.b64decode(challenge.encrypted_secret),
        )
        _, transport = generate_key_pair("ec-p256")
        signature = device.sign_external(transport)
        answer = client.activate(
            Activation(
                secret=base64.b64encode(secret).decode(),
                transport_key=transport.decode(),
                transport_signature=base64.b64encode(signature).decode(),
            )
        )
        assert answer.bound is True
    with plane.admin() as admin:
        results = [
            (e["kind"], e["result"])
            for e in entries_since(admin, start)
            if e["kind"].startswith("attestation.") and e["subject"] == f"node:{name}"
        ]
    assert results == [("attestation.enroll", "pass"), ("attestation.activate", "pass")]


def test_a_tpm_without_a_vendor_certificate_is_refused(
    plane: RunningControlPlane, swtpm: RunningSwtpm, vendor_tpm: RunningSwtpm
) -> None:
    name, client = node_client(plane)
    start = log_size(plane)
    with client, Tpm(swtpm.tcti) as device:
        ident = device.identity()
        assert ident.ek_cert is None
        with pytest.raises(IntegrityError, match="EK certificate from a configured vendor CA"):
            enroll(client, ident, None)
        # The vendor TPM's certificate, presented for this TPM's EK.
        with Tpm(vendor_tpm.tcti) as vendor:
            borrowed = vendor.identity().ek_cert
        with pytest.raises(IntegrityError, match="for another key"):
            enroll(client, ident, borrowed)
    with plane.admin() as admin:
        refused = [
            e["reason"]
            for e in entries_since(admin, start)
            if e["kind"] == "attestation.enroll" and e["subject"] == f"node:{name}"
        ]
    assert len(refused) == 2
    assert "for another key" in refused[1]
