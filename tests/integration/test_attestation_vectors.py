"""The pure-Python verifier against the reference tools (tpm2-tools) and swtpm.

- tpm2_makecredential (in software, `--tcti none`) seals a credential that
  the verifier's own inverse opens with the EK's private key: same seed
  wrapping, KDFa, AES-CFB and outer HMAC, byte for byte in meaning.
- trustplane's MakeCredential is consumed by the real TPM's
  ActivateCredential: through tpm2-pytss (our EK and AK), and through
  tpm2_activatecredential (tpm2-tools' EK and an AK child of it, whose
  Name the verifier computes identically).
- A quote made by swtpm is accepted by both the verifier and
  tpm2_checkquote, and a quote over another nonce is refused by both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import component_missing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tpm2_pytss.TSS2_Exception import TSS2_Exception

from trustplane.agent.tpm import Tpm
from trustplane.embedded.swtpm import RunningSwtpm
from trustplane.errors import IntegrityError
from trustplane.trust import tpm
from trustplane.trust.attestation import Event, verify_quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trust"))
from tpm_helpers import ecc_public, rsa_ek_public

TOOLS_MAGIC = 0xBADCC0DE


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        component_missing(name, "install the Debian package tpm2-tools")
    return path


def tools_credential(
    ek_public: bytes, name: bytes, secret: bytes, work: Path
) -> tuple[bytes, bytes]:
    (work / "ek.pub").write_bytes(tpm.tpm2b(ek_public))
    (work / "secret").write_bytes(secret)
    subprocess.run(
        [
            tool("tpm2_makecredential"),
            "--tcti",
            "none",
            "-u",
            str(work / "ek.pub"),
            "-s",
            str(work / "secret"),
            "-n",
            name.hex(),
            "-o",
            str(work / "cred"),
        ],
        check=True,
        capture_output=True,
    )
    reader = tpm.Reader((work / "cred").read_bytes(), "tpm2-tools credential")
    assert (reader.u32(), reader.u32()) == (TOOLS_MAGIC, 1)
    blob, encrypted = reader.tpm2b(), reader.tpm2b()
    reader.end()
    return blob, encrypted


def test_tpm2_tools_rsa_credential_opens_with_our_kdfs(tmp_path: Path) -> None:
    private = rsa.generate_private_key(65537, 2048)
    ek = tpm.parse_public(rsa_ek_public(private.public_key()))
    name = b"\x00\x0b" + os.urandom(32)
    secret = os.urandom(32)
    blob, encrypted = tools_credential(ek.raw, name, secret, tmp_path)
    seed = private.decrypt(
        encrypted,
        padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\0"
        ),
    )
    assert tpm.open_credential_blob(ek, seed, name, blob) == secret
    # Structure: ours has the same shape (HMAC digest, then encIdentity of equal size).
    ours = tpm.make_credential(ek, name, secret)
    assert len(ours.blob) == len(blob)
    assert ours.blob[:2] == blob[:2] == b"\x00\x20"
    assert len(ours.secret) == len(encrypted) == 256


def test_tpm2_tools_ecc_credential_opens_with_our_kdfe(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    ek = tpm.parse_public(ecc_public(private.public_key(), 0x000300B2, ek=True))
    name = b"\x00\x0b" + os.urandom(32)
    blob, encrypted = tools_credential(ek.raw, name, b"ecc secret", tmp_path)
    reader = tpm.Reader(encrypted, "point")
    x, y = reader.tpm2b(), reader.tpm2b()
    point = ec.EllipticCurvePublicNumbers(int.from_bytes(x), int.from_bytes(y), ec.SECP256R1())
    z = private.exchange(ec.ECDH(), point.public_key())
    seed = tpm.kdfe(tpm.ALG_SHA256, z, b"IDENTITY", x, ek.ecc_x, 256)
    assert tpm.open_credential_blob(ek, seed, name, blob) == b"ecc secret"


def test_swtpm_activates_our_credential_and_only_for_its_ak(swtpm: RunningSwtpm) -> None:
    with Tpm(swtpm.tcti) as device:
        ident = device.identity()
        ek = tpm.parse_public(ident.ek_public)
        secret = os.urandom(32)
        credential = tpm.make_credential(ek, ident.ak_name, secret)
        assert device.activate_credential(credential.blob, credential.secret) == secret
        other = tpm.make_credential(ek, b"\x00\x0b" + os.urandom(32), secret)
        with pytest.raises(TSS2_Exception, match="integrity"):
            device.activate_credential(other.blob, other.secret)


def checkquote(ak_pem: Path, attest: bytes, signature: bytes, nonce: bytes, work: Path) -> bool:
    (work / "msg").write_bytes(attest)
    (work / "sig").write_bytes(signature)
    result = subprocess.run(
        [
            tool("tpm2_checkquote"),
            "-u",
            str(ak_pem),
            "-m",
            str(work / "msg"),
            "-s",
            str(work / "sig"),
            "-g",
            "sha256",
            "-q",
            nonce.hex(),
        ],
        capture_output=True,
        text=True,
    )
    return result.returncode == 0


def test_swtpm_quote_verifies_here_and_in_tpm2_checkquote(
    swtpm: RunningSwtpm, tmp_path: Path
) -> None:
    with Tpm(swtpm.tcti) as device:  # a fresh swtpm: PCR 13 is zero
        measured = "sha256:" + hashlib.sha256(b"layer").hexdigest()
        device.extend(13, bytes.fromhex(measured[7:]))
        nonce = os.urandom(32)
        quote = device.quote(nonce, (13,))
        ak_public = device.identity().ak_public
    ak = tpm.parse_public(ak_public)
    pem = tmp_path / "ak.pem"
    pem.write_bytes(
        ak.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    events = [Event(13, measured, "repo", "sha256:" + "0" * 64, 0, "blob")]
    verified = verify_quote(ak_public, quote.attest, quote.signature, nonce, events, (13,))
    assert verified.quote.extra_data == nonce
    assert checkquote(pem, quote.attest, quote.signature, nonce, tmp_path)

    other = os.urandom(32)
    with pytest.raises(IntegrityError, match="nonce"):
        verify_quote(ak_public, quote.attest, quote.signature, other, events, (13,))
    assert not checkquote(pem, quote.attest, quote.signature, other, tmp_path)
    # One flipped bit of the attested data: both refuse the signature.
    flipped = quote.attest[:-1] + bytes([quote.attest[-1] ^ 1])
    with pytest.raises(IntegrityError, match="signature"):
        verify_quote(ak_public, flipped, quote.signature, nonce, events, (13,))
    assert not checkquote(pem, flipped, quote.signature, nonce, tmp_path)
    assert struct.unpack(">I", quote.attest[:4])[0] == tpm.TPM_GENERATED_VALUE


def test_tpm2_activatecredential_consumes_our_credential(
    swtpm: RunningSwtpm, tmp_path: Path
) -> None:
    """The other direction with the reference tool: an EK and an AK (a child of
    the EK) made by tpm2-tools in swtpm, our MakeCredential, their activation."""
    env = {**os.environ, "TPM2TOOLS_TCTI": swtpm.tcti}

    def run(*argv: str) -> None:
        result = subprocess.run(
            [tool(argv[0]), *argv[1:]], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr

    try:
        run("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
        run(
            "tpm2_createak",
            *("-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa"),
            *("-u", "ak.pub", "-n", "ak.name"),
        )
        run("tpm2_flushcontext", "-t")
        ek = tpm.parse_public(tpm.unwrap_tpm2b((tmp_path / "ek.pub").read_bytes(), "ek.pub"))
        name = (tmp_path / "ak.name").read_bytes()
        ak = tpm.parse_public(tpm.unwrap_tpm2b((tmp_path / "ak.pub").read_bytes(), "ak.pub"))
        tpm.check_ak(ak)
        assert ak.name == name  # our Name computation, against the TPM's
        secret = os.urandom(32)
        credential = tpm.make_credential(ek, name, secret)
        (tmp_path / "cred.in").write_bytes(
            struct.pack(">II", TOOLS_MAGIC, 1)
            + tpm.tpm2b(credential.blob)
            + tpm.tpm2b(credential.secret)
        )
        run("tpm2_startauthsession", "--policy-session", "-S", "session.ctx")
        run("tpm2_policysecret", "-S", "session.ctx", "-c", "e")
        run(
            "tpm2_activatecredential",
            *("-c", "ak.ctx", "-C", "ek.ctx", "-i", "cred.in", "-o", "out"),
            *("-P", "session:session.ctx"),
        )
        assert (tmp_path / "out").read_bytes() == secret
    finally:
        for kind in ("-t", "-s"):
            subprocess.run(
                [tool("tpm2_flushcontext"), kind], env=env, cwd=tmp_path, capture_output=True
            )
