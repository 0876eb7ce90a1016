"""JWE wrapping of layer options: the shapes ocicrypt reads, and tamper handling."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from jwcrypto import jwe
from jwcrypto.common import json_encode

from trustplane.crypto.keys import RecipientKey, UnwrapKey, load_recipient_key, load_unwrap_key
from trustplane.crypto.keywrap import MAX_JWE_SIZE, WrappedFor, recipients_of, unwrap, wrap
from trustplane.errors import IntegrityError, MalformedError

PAYLOAD = b'{"symkey":"AAAA","digest":"sha256:00","cipheroptions":{"nonce":"AAAA"}}'


class Pair:
    def __init__(self, private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, name: str):
        self.private = private
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.recipient: RecipientKey = load_recipient_key(pem, name)
        self.unwrap: UnwrapKey = load_unwrap_key(pem, name)


@pytest.fixture(scope="module")
def rsa_pair() -> Pair:
    return Pair(rsa.generate_private_key(public_exponent=65537, key_size=2048), "rsa.pem")


@pytest.fixture(scope="module")
def ec_pair() -> Pair:
    return Pair(ec.generate_private_key(ec.SECP256R1()), "ec.pem")


@pytest.fixture(scope="module")
def ec384_pair() -> Pair:
    return Pair(ec.generate_private_key(ec.SECP384R1()), "ec384.pem")


@pytest.fixture(scope="module")
def stranger() -> Pair:
    return Pair(ec.generate_private_key(ec.SECP256R1()), "stranger.pem")


@pytest.fixture(scope="module")
def rsa_stranger() -> Pair:
    return Pair(rsa.generate_private_key(public_exponent=65537, key_size=2048), "other-rsa.pem")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _content(document: dict[str, Any], cek: bytes) -> bytes:
    """RFC 7516 content decryption, A256GCM, AAD = the protected header as sent."""
    aad = document["protected"].encode("ascii")
    iv = _b64url_decode(document["iv"])
    sealed = _b64url_decode(document["ciphertext"]) + _b64url_decode(document["tag"])
    return AESGCM(cek).decrypt(iv, sealed, aad)


def _rsa_oaep_sha1_cek(private: rsa.RSAPrivateKey, entry: dict[str, Any]) -> bytes:
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    return private.decrypt(_b64url_decode(entry["encrypted_key"]), oaep)


def _ecdh_es_a256kw_cek(private: ec.EllipticCurvePrivateKey, entry: dict[str, Any]) -> bytes:
    """RFC 7518 4.6: Concat KDF over Z with AlgorithmID = alg, empty apu/apv."""
    epk = entry["header"]["epk"]
    assert epk["crv"] == "P-256"
    ephemeral = ec.EllipticCurvePublicNumbers(
        int.from_bytes(_b64url_decode(epk["x"]), "big"),
        int.from_bytes(_b64url_decode(epk["y"]), "big"),
        ec.SECP256R1(),
    ).public_key()
    shared = private.exchange(ec.ECDH(), ephemeral)
    alg = b"ECDH-ES+A256KW"
    other = struct.pack(">I", len(alg)) + alg + struct.pack(">III", 0, 0, 256)
    kek = ConcatKDFHash(algorithm=hashes.SHA256(), length=32, otherinfo=other).derive(shared)
    return aes_key_unwrap(kek, _b64url_decode(entry["encrypted_key"]))


# -- shape --------------------------------------------------------------------


def test_one_recipient_gives_flattened_json_jwe(rsa_pair: Pair) -> None:
    document = json.loads(wrap(PAYLOAD, [rsa_pair.recipient]))
    assert "recipients" not in document
    assert {"protected", "header", "encrypted_key", "iv", "ciphertext", "tag"} <= set(document)
    assert json.loads(_b64url_decode(document["protected"])) == {"enc": "A256GCM"}
    assert document["header"] == {"alg": "RSA-OAEP", "kid": rsa_pair.recipient.kid}
    assert len(_b64url_decode(document["iv"])) == 12


def test_several_recipients_give_general_form_with_alg_per_recipient(
    rsa_pair: Pair, ec_pair: Pair
) -> None:
    document = json.loads(wrap(PAYLOAD, [rsa_pair.recipient, ec_pair.recipient]))
    assert "header" not in document
    assert "encrypted_key" not in document
    entries = document["recipients"]
    assert [e["header"]["alg"] for e in entries] == ["RSA-OAEP", "ECDH-ES+A256KW"]
    assert [e["header"]["kid"] for e in entries] == [
        rsa_pair.recipient.kid,
        ec_pair.recipient.kid,
    ]
    assert entries[1]["header"]["epk"]["kty"] == "EC"


def test_wrap_needs_a_recipient() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        wrap(PAYLOAD, [])


def test_wrapping_is_randomized(ec_pair: Pair) -> None:
    assert wrap(PAYLOAD, [ec_pair.recipient]) != wrap(PAYLOAD, [ec_pair.recipient])


# -- independent decryption: what go-jose/ocicrypt will compute ------------------


def test_rsa_recipient_is_rsa_oaep_with_sha1_and_a256gcm(rsa_pair: Pair) -> None:
    document = json.loads(wrap(PAYLOAD, [rsa_pair.recipient]))
    assert isinstance(rsa_pair.private, rsa.RSAPrivateKey)
    cek = _rsa_oaep_sha1_cek(rsa_pair.private, document)
    assert len(cek) == 32
    assert _content(document, cek) == PAYLOAD


def test_ec_recipient_is_ecdh_es_a256kw_with_concat_kdf(rsa_pair: Pair, ec_pair: Pair) -> None:
    document = json.loads(wrap(PAYLOAD, [rsa_pair.recipient, ec_pair.recipient]))
    assert isinstance(ec_pair.private, ec.EllipticCurvePrivateKey)
    cek = _ecdh_es_a256kw_cek(ec_pair.private, document["recipients"][1])
    assert _content(document, cek) == PAYLOAD


# -- reading headers ----------------------------------------------------------------


def test_recipients_of_reads_alg_kid_and_curve(
    rsa_pair: Pair, ec_pair: Pair, ec384_pair: Pair
) -> None:
    serialized = wrap(PAYLOAD, [rsa_pair.recipient, ec_pair.recipient, ec384_pair.recipient])
    assert recipients_of(serialized) == [
        WrappedFor("RSA-OAEP", rsa_pair.recipient.kid, None),
        WrappedFor("ECDH-ES+A256KW", ec_pair.recipient.kid, "P-256"),
        WrappedFor("ECDH-ES+A256KW", ec384_pair.recipient.kid, "P-384"),
    ]
    single = wrap(PAYLOAD, [ec_pair.recipient])
    assert recipients_of(single) == [WrappedFor("ECDH-ES+A256KW", ec_pair.recipient.kid, "P-256")]


# -- unwrapping ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa_pair", "ec_pair", "ec384_pair"])
def test_each_recipient_unwraps(which: str, request: pytest.FixtureRequest) -> None:
    pairs = [request.getfixturevalue(n) for n in ("rsa_pair", "ec_pair", "ec384_pair")]
    serialized = wrap(PAYLOAD, [p.recipient for p in pairs])
    me: Pair = request.getfixturevalue(which)
    assert unwrap(serialized, [me.unwrap], "layer 0") == PAYLOAD
    single = wrap(PAYLOAD, [me.recipient])
    assert unwrap(single, [me.unwrap], "layer 0") == PAYLOAD


def test_a_key_that_is_not_a_recipient_gets_none(
    rsa_pair: Pair, ec_pair: Pair, stranger: Pair
) -> None:
    assert unwrap(wrap(PAYLOAD, [ec_pair.recipient]), [stranger.unwrap], "l") is None
    assert unwrap(wrap(PAYLOAD, [rsa_pair.recipient]), [stranger.unwrap], "l") is None
    both = wrap(PAYLOAD, [rsa_pair.recipient, ec_pair.recipient])
    assert unwrap(both, [stranger.unwrap], "l") is None
    assert unwrap(both, [], "l") is None
    # A recipient among strangers still opens it, whatever the order.
    assert unwrap(both, [stranger.unwrap, ec_pair.unwrap], "l") == PAYLOAD


def test_a_key_of_the_same_kind_that_is_not_a_recipient_gets_none(
    rsa_pair: Pair, ec_pair: Pair, ec384_pair: Pair, stranger: Pair, rsa_stranger: Pair
) -> None:
    """OAEP or AES key unwrap fails for these: that is "not for you", never tampering."""
    assert unwrap(wrap(PAYLOAD, [rsa_pair.recipient]), [rsa_stranger.unwrap], "l") is None
    assert unwrap(wrap(PAYLOAD, [ec384_pair.recipient]), [stranger.unwrap], "l") is None
    skopeo_style = _skopeo_style([rsa_pair])
    assert unwrap(skopeo_style, [rsa_stranger.unwrap], "l") is None
    skopeo_style = _skopeo_style([ec_pair])
    assert unwrap(skopeo_style, [stranger.unwrap], "l") is None


def _tamper(serialized: str, field: str) -> str:
    document = json.loads(serialized)
    raw = bytearray(_b64url_decode(document[field]))
    raw[0] ^= 0x01
    document[field] = _b64url(bytes(raw))
    return json.dumps(document)


@pytest.mark.parametrize("field", ["ciphertext", "tag", "iv"])
@pytest.mark.parametrize("which", ["rsa_pair", "ec_pair"])
def test_tampered_jwe_for_a_named_recipient_is_an_integrity_error(
    field: str, which: str, request: pytest.FixtureRequest
) -> None:
    me: Pair = request.getfixturevalue(which)
    tampered = _tamper(wrap(PAYLOAD, [me.recipient]), field)
    with pytest.raises(IntegrityError, match=r"^layer 2: .*altered") as info:
        unwrap(tampered, [me.unwrap], "layer 2")
    assert "\n" not in str(info.value)


def test_tampered_encrypted_key_for_a_named_recipient_is_an_integrity_error(
    rsa_pair: Pair, ec_pair: Pair
) -> None:
    for me in (rsa_pair, ec_pair):
        tampered = _tamper(wrap(PAYLOAD, [me.recipient]), "encrypted_key")
        with pytest.raises(IntegrityError):
            unwrap(tampered, [me.unwrap], "layer")


def test_altered_protected_header_is_an_integrity_error(ec_pair: Pair) -> None:
    document = json.loads(wrap(PAYLOAD, [ec_pair.recipient]))
    document["protected"] = _b64url(b'{"enc":"A256GCM","x":1}')
    with pytest.raises(IntegrityError):
        unwrap(json.dumps(document), [ec_pair.unwrap], "layer")


def test_tampering_a_jwe_not_for_us_is_not_our_business(ec_pair: Pair, stranger: Pair) -> None:
    tampered = _tamper(wrap(PAYLOAD, [ec_pair.recipient]), "ciphertext")
    assert unwrap(tampered, [stranger.unwrap], "layer") is None


# -- JWEs as skopeo writes them: alg in the protected header, no kid -----------------


def _skopeo_style(recipients: list[Pair]) -> str:
    if len(recipients) == 1:
        alg = recipients[0].recipient.alg
        token = jwe.JWE(PAYLOAD, protected=json_encode({"alg": alg, "enc": "A256GCM"}))
        token.add_recipient(recipients[0].recipient.jwk)
    else:
        token = jwe.JWE(PAYLOAD, protected=json_encode({"enc": "A256GCM"}))
        for pair in recipients:
            token.add_recipient(pair.recipient.jwk, header=json_encode({"alg": pair.recipient.alg}))
    serialized: str = token.serialize(compact=False)
    return serialized


@pytest.mark.parametrize("which", ["rsa_pair", "ec_pair"])
def test_skopeo_style_jwe_without_kid_unwraps(which: str, request: pytest.FixtureRequest) -> None:
    me: Pair = request.getfixturevalue(which)
    serialized = _skopeo_style([me])
    document = json.loads(serialized)
    assert "kid" not in json.loads(_b64url_decode(document["protected"]))
    assert recipients_of(serialized)[0].kid is None
    assert recipients_of(serialized)[0].alg == me.recipient.alg
    assert unwrap(serialized, [me.unwrap], "layer") == PAYLOAD


def test_skopeo_style_general_form_unwraps(rsa_pair: Pair, ec_pair: Pair, stranger: Pair) -> None:
    serialized = _skopeo_style([rsa_pair, ec_pair])
    assert [w.kid for w in recipients_of(serialized)] == [None, None]
    assert unwrap(serialized, [ec_pair.unwrap], "layer") == PAYLOAD
    assert unwrap(serialized, [rsa_pair.unwrap], "layer") == PAYLOAD
    assert unwrap(serialized, [stranger.unwrap], "layer") is None


@pytest.mark.parametrize("which", ["rsa_pair", "ec_pair"])
def test_tampered_skopeo_style_jwe_is_still_an_integrity_error(
    which: str, request: pytest.FixtureRequest
) -> None:
    # No kid names us, but our key unwraps the content key and GCM then fails.
    me: Pair = request.getfixturevalue(which)
    tampered = _tamper(_skopeo_style([me]), "ciphertext")
    with pytest.raises(IntegrityError):
        unwrap(tampered, [me.unwrap], "layer")


# -- malformed input ----------------------------------------------------------------------


def _protected(header: dict[str, Any]) -> str:
    return _b64url(json.dumps(header).encode())


@pytest.mark.parametrize(
    "serialized",
    [
        "not json",
        "[]",
        '"string"',
        "{}",
        json.dumps({"recipients": []}),
        json.dumps({"recipients": "x", "protected": _protected({"enc": "A256GCM"})}),
        json.dumps({"recipients": [1], "protected": _protected({"enc": "A256GCM"})}),
        json.dumps({"protected": 5}),
        json.dumps({"protected": "!!!"}),
        json.dumps({"protected": _b64url(b"[1]")}),
        json.dumps({"protected": _protected({"enc": "A256GCM"}), "header": "x"}),
        " " * (MAX_JWE_SIZE + 1),
    ],
)
def test_malformed_jwe_is_refused_in_one_line(serialized: str) -> None:
    with pytest.raises(MalformedError) as info:
        recipients_of(serialized)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "header",
    [
        {"enc": "A128GCM"},
        {"enc": "A256CBC-HS512"},
        {"enc": "A256GCM", "zip": "DEF"},
    ],
)
def test_unwrap_refuses_other_content_encryption(header: dict[str, Any], ec_pair: Pair) -> None:
    document = json.loads(wrap(PAYLOAD, [ec_pair.recipient]))
    document["protected"] = _protected(header)
    with pytest.raises(MalformedError, match="A256GCM"):
        unwrap(json.dumps(document), [ec_pair.unwrap], "layer")


def test_weak_key_algorithms_are_not_accepted(rsa_pair: Pair) -> None:
    """An RSA1_5 JWE (allowed by some libraries) is never opened."""
    token = jwe.JWE(PAYLOAD, protected=json_encode({"alg": "RSA1_5", "enc": "A256GCM"}))
    token.allowed_algs = ["RSA1_5", "A256GCM"]
    token.add_recipient(rsa_pair.recipient.jwk)
    serialized = token.serialize(compact=False)
    assert unwrap(serialized, [rsa_pair.unwrap], "layer") is None


# -- the direct path and jwcrypto agree ------------------------------------------------
#
# `wrap` and the plain-shape `unwrap` use cryptography's primitives directly;
# anything unusual is left to jwcrypto. These check that jwcrypto reads what
# `wrap` writes, that the direct path (not the fallback) opens what jwcrypto
# and skopeo write, and that both give the same answer on tampered input.


def _jwcrypto_open(serialized: str, pair: Pair) -> bytes:
    token = jwe.JWE()
    token.allowed_algs = ["RSA-OAEP", "ECDH-ES+A256KW", "A256GCM"]
    token.deserialize(serialized, pair.unwrap.jwk)
    payload: bytes = token.payload
    return payload


@pytest.mark.parametrize("which", ["rsa_pair", "ec_pair", "ec384_pair"])
def test_jwcrypto_reads_what_wrap_writes(which: str, request: pytest.FixtureRequest) -> None:
    me: Pair = request.getfixturevalue(which)
    others = [p for p in ("rsa_pair", "ec_pair") if p != which]
    general = wrap(PAYLOAD, [request.getfixturevalue(others[0]).recipient, me.recipient])
    assert _jwcrypto_open(wrap(PAYLOAD, [me.recipient]), me) == PAYLOAD
    assert _jwcrypto_open(general, me) == PAYLOAD


def test_p521_recipient_round_trip() -> None:
    pair = Pair(ec.generate_private_key(ec.SECP521R1()), "ec521.pem")
    serialized = wrap(PAYLOAD, [pair.recipient])
    assert len(_b64url_decode(json.loads(serialized)["header"]["epk"]["x"])) == 66
    assert _jwcrypto_open(serialized, pair) == PAYLOAD
    assert unwrap(serialized, [pair.unwrap], "layer") == PAYLOAD


def _no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from trustplane.crypto import keywrap

    def refuse(*_: object) -> None:
        raise AssertionError("jwcrypto fallback used for a plain JWE")

    monkeypatch.setattr(keywrap, "_open_with_jwcrypto", refuse)


@pytest.mark.parametrize("which", ["rsa_pair", "ec_pair", "ec384_pair"])
def test_plain_jwes_open_without_the_fallback(
    which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    me: Pair = request.getfixturevalue(which)
    made_by_jwcrypto = jwe.JWE(PAYLOAD, protected=json_encode({"enc": "A256GCM"}))
    made_by_jwcrypto.add_recipient(me.recipient.jwk, header=json_encode({"alg": me.recipient.alg}))
    serialized = made_by_jwcrypto.serialize(compact=False)
    skopeo = _skopeo_style([me])
    _no_fallback(monkeypatch)
    assert unwrap(serialized, [me.unwrap], "layer") == PAYLOAD
    assert unwrap(skopeo, [me.unwrap], "layer") == PAYLOAD
    assert unwrap(wrap(PAYLOAD, [me.recipient]), [me.unwrap], "layer") == PAYLOAD


def test_party_info_is_part_of_the_key_derivation(
    ec_pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = jwe.JWE(PAYLOAD, protected=json_encode({"enc": "A256GCM"}))
    header = {"alg": "ECDH-ES+A256KW", "apu": _b64url(b"alice"), "apv": _b64url(b"bob")}
    token.add_recipient(ec_pair.recipient.jwk, header=json_encode(header))
    serialized = token.serialize(compact=False)
    _no_fallback(monkeypatch)
    assert unwrap(serialized, [ec_pair.unwrap], "layer") == PAYLOAD


def _outcome(serialized: str, keys: list[UnwrapKey]) -> object:
    try:
        return unwrap(serialized, keys, "layer")
    except (IntegrityError, MalformedError) as exc:
        return type(exc)


def _variants(pairs: list[Pair]) -> list[str]:
    """Well-formed, tampered and odd JWEs for `pairs`."""
    plain = wrap(PAYLOAD, [p.recipient for p in pairs])
    single = wrap(PAYLOAD, [pairs[0].recipient])
    out = [plain, single, _skopeo_style(pairs[:1]), _skopeo_style(pairs)]
    for base in (plain, single):
        for field in ("ciphertext", "tag", "iv"):
            out.append(_tamper(base, field))
    document = json.loads(single)
    document["encrypted_key"] = _b64url(b"\x00" * 40)
    out.append(json.dumps(document))
    document = json.loads(single)
    document["header"]["kid"] = "someone-else"
    out.append(json.dumps(document))
    document = json.loads(single)
    document["protected"] = _protected({"enc": "A256GCM", "crit": ["exp"], "exp": 1})
    out.append(json.dumps(document))
    document = json.loads(single)
    document["aad"] = _b64url(b"extra")
    out.append(json.dumps(document))
    document = json.loads(single)
    document["protected"] += "="  # padded: jwcrypto authenticates the re-encoding
    out.append(json.dumps(document))
    document = json.loads(single)
    document["header"]["enc"] = "A256GCM"  # duplicate of a protected header
    out.append(json.dumps(document))
    document = json.loads(single)
    if "epk" in document["header"]:
        document["header"]["epk"]["y"] = document["header"]["epk"]["x"]  # not on the curve
        out.append(json.dumps(document))
    return out


def test_direct_path_and_jwcrypto_agree(
    rsa_pair: Pair, ec_pair: Pair, ec384_pair: Pair, stranger: Pair
) -> None:
    from trustplane.crypto import keywrap

    key_sets = [
        [ec_pair.unwrap],
        [rsa_pair.unwrap],
        [ec384_pair.unwrap],
        [stranger.unwrap],
        [stranger.unwrap, ec_pair.unwrap],
        [rsa_pair.unwrap, ec384_pair.unwrap],
    ]
    compared = 0
    for pairs in ([ec_pair], [rsa_pair], [ec384_pair], [ec_pair, rsa_pair]):
        for serialized in _variants(pairs):
            for keys in key_sets:
                direct = _outcome(serialized, keys)
                original = keywrap._fast_form
                keywrap._fast_form = lambda *_: None  # type: ignore[assignment]
                try:
                    reference = _outcome(serialized, keys)
                finally:
                    keywrap._fast_form = original
                assert direct == reference, (serialized, [k.source for k in keys])
                compared += 1
    assert compared > 200
