"""The verifier's TPM cryptography with software keys: MakeCredential's
inverse, KDFs, and every way a quote can be wrong."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tpm_helpers import AK_ATTRS, ak_public, attest, ecc_public, rsa_ek_public, sign

from trustplane.errors import IntegrityError, MalformedError, TrustplaneError, UnsupportedError
from trustplane.trust import tpm
from trustplane.trust.attestation import Event, extend, replay, verify_quote

OAEP_IDENTITY = padding.OAEP(
    mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\0"
)
MANIFEST = "sha256:" + "ab" * 32


def event(data: bytes, layer: int = 0, kind: str = "diff_id") -> Event:
    return Event(13, "sha256:" + hashlib.sha256(data).hexdigest(), "repo", MANIFEST, layer, kind)


@pytest.fixture(scope="module")
def rsa_ek() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def test_kdfa_counter_mode_matches_a_direct_computation() -> None:
    import hmac
    import struct

    key, bits = b"k" * 32, 384
    expected = b""
    for i in (1, 2):
        expected += hmac.new(
            key, struct.pack(">I", i) + b"STORAGE\0uv" + struct.pack(">I", bits), "sha256"
        ).digest()
    assert tpm.kdfa(tpm.ALG_SHA256, key, b"STORAGE", b"u", b"v", bits) == expected[:48]
    assert len(tpm.kdfa(tpm.ALG_SHA256, key, b"STORAGE", b"", b"", 128)) == 16


def test_rsa_credential_opens_with_the_ek_private_key(rsa_ek: rsa.RSAPrivateKey) -> None:
    ek = tpm.parse_public(rsa_ek_public(rsa_ek.public_key()))
    name = b"\x00\x0b" + os.urandom(32)
    secret = os.urandom(32)
    credential = tpm.make_credential(ek, name, secret)
    seed = rsa_ek.decrypt(credential.secret, OAEP_IDENTITY)
    assert len(seed) == 32
    assert tpm.open_credential_blob(ek, seed, name, credential.blob) == secret
    with pytest.raises(IntegrityError, match="HMAC"):
        tpm.open_credential_blob(ek, seed, b"\x00\x0b" + os.urandom(32), credential.blob)


def test_ecc_credential_opens_with_the_ek_private_key() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    ek = tpm.parse_public(ecc_public(private.public_key(), 0x000300B2, ek=True))
    name = b"\x00\x0b" + os.urandom(32)
    credential = tpm.make_credential(ek, name, b"secret")
    x, y = _point(credential.secret)
    ephemeral = ec.EllipticCurvePublicNumbers(
        int.from_bytes(x), int.from_bytes(y), ec.SECP256R1()
    ).public_key()
    z = private.exchange(ec.ECDH(), ephemeral)
    seed = tpm.kdfe(tpm.ALG_SHA256, z, b"IDENTITY", x, ek.ecc_x, 256)
    assert tpm.open_credential_blob(ek, seed, name, credential.blob) == b"secret"


def _point(secret: bytes) -> tuple[bytes, bytes]:
    reader = tpm.Reader(secret, "point")
    x, y = reader.tpm2b(), reader.tpm2b()
    reader.end()
    return x, y


def test_a_credential_is_refused_for_a_key_that_is_no_ek() -> None:
    ak = tpm.parse_public(ak_public(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(TrustplaneError):
        tpm.make_credential(ak, b"\x00\x0b" + bytes(32), b"x")


def test_public_area_parsing_is_strict(rsa_ek: rsa.RSAPrivateKey) -> None:
    raw = rsa_ek_public(rsa_ek.public_key())
    parsed = tpm.parse_public(raw)
    assert parsed.rsa_bits == 2048
    assert parsed.symmetric == (tpm.ALG_AES, 128, tpm.ALG_CFB)
    assert parsed.name == b"\x00\x0b" + hashlib.sha256(raw).digest()
    with pytest.raises(MalformedError, match="trailing"):
        tpm.parse_public(raw + b"\0")
    with pytest.raises(MalformedError, match="truncated"):
        tpm.parse_public(raw[:-1])
    with pytest.raises(UnsupportedError):
        tpm.parse_public(b"\x00\x08" + raw[2:])


class SoftTpm:
    """A restricted ECDSA AK in software, quoting PCR 13."""

    def __init__(self, attrs: int = AK_ATTRS) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public = ak_public(self.key, attrs)
        self.name = tpm.parse_public(self.public).name

    def quote(self, nonce: bytes, events: list[Event]) -> tuple[bytes, bytes]:
        values = replay(events)
        body = attest(self.name, nonce, [values.get(13, bytes(32))])
        return body, sign(self.key, body)


def test_a_good_quote_verifies_and_replays() -> None:
    soft = SoftTpm()
    events = [event(b"a"), event(b"b", 1)]
    nonce = os.urandom(32)
    body, signature = soft.quote(nonce, events)
    verified = verify_quote(soft.public, body, signature, nonce, events, (13,))
    assert verified.quote.extra_data == nonce
    value = extend(extend(bytes(32), events[0].digest), events[1].digest)
    assert verified.quote.pcr_digest == hashlib.sha256(value).digest()


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("nonce", "does not carry the nonce"),
        ("log", "does not replay"),
        ("signature", "does not verify"),
        ("signer", "does not verify"),
        ("pcrs", "select exactly"),
        ("stray", "not quoted"),
        ("truncated", "truncated"),
        ("magic", "does not verify"),
    ],
)
def test_a_wrong_quote_fails(fault: str, message: str) -> None:
    soft = SoftTpm()
    events = [event(b"a")]
    nonce = os.urandom(32)
    body, signature = soft.quote(nonce, events)
    given_nonce, given_events, pcrs, public = nonce, events, (13,), soft.public
    if fault == "nonce":
        given_nonce = os.urandom(32)
    elif fault == "log":
        given_events = [event(b"other")]
    elif fault == "signature":
        signature = sign(soft.key, body + b"x")
    elif fault == "signer":
        public = SoftTpm().public
    elif fault == "pcrs":
        pcrs = (12, 13)
    elif fault == "stray":
        given_events = [*events, Event(16, events[0].digest, "repo", MANIFEST, 0, "blob")]
        pcrs = (13,)
    elif fault == "truncated":
        body = body[:-3]
        signature = sign(soft.key, body)
    elif fault == "magic":
        body = b"\x00" + body[1:]
    with pytest.raises((IntegrityError, MalformedError), match=message):
        verify_quote(public, body, signature, given_nonce, given_events, pcrs)


@pytest.mark.parametrize(
    "missing", [tpm.RESTRICTED, tpm.FIXED_TPM, tpm.FIXED_PARENT, tpm.SENSITIVE_DATA_ORIGIN]
)
def test_an_ak_without_its_attributes_is_refused(missing: int) -> None:
    soft = SoftTpm(AK_ATTRS & ~missing)
    nonce = os.urandom(32)
    body, signature = soft.quote(nonce, [])
    with pytest.raises(IntegrityError, match="lacks the attributes"):
        verify_quote(soft.public, body, signature, nonce, [], (13,))


def test_garbage_fails_closed() -> None:
    soft = SoftTpm()
    for body, signature in [(b"", b""), (os.urandom(200), os.urandom(70)), (b"\xff" * 50, b"")]:
        with pytest.raises(TrustplaneError):
            verify_quote(soft.public, body, signature, b"n", [], (13,))


def test_event_log_entries_are_validated() -> None:
    good = event(b"a").to_json()
    assert Event.from_json(good) == event(b"a")
    for bad in [
        {**good, "pcr": 24},
        {**good, "digest": "sha256:00"},
        {**good, "kind": "other"},
        {**good, "layer": -1},
        {"pcr": 13},
        "string",
    ]:
        with pytest.raises(MalformedError):
            Event.from_json(bad)
