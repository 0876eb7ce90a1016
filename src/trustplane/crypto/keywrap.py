"""Wrapping a layer's private options to recipients with JWE, as ocicrypt does.

Content encryption is A256GCM; each recipient's key wraps the content key
with RSA-OAEP (SHA-1, as go-jose and ocicrypt use) or ECDH-ES+A256KW. One
recipient gives a flattened JSON JWE, several the general form; each
recipient header carries `alg` and, beyond what ocicrypt writes, the
recipient's RFC 7638 thumbprint as `kid` (go-jose ignores it), so that
`image inspect` can say who can open a layer and a failed unwrap for a
named recipient is reported as tampering rather than as "not for you".

The JWE arithmetic is done here with `cryptography`'s primitives (ECDH,
Concat KDF, AES key wrap, RSA-OAEP, AES-GCM) rather than through jwcrypto's
JWE objects, for speed: the control plane's KMS opens one JWE and writes
another for every unwrap, and jwcrypto spends 0.5-0.6 ms on each (a fresh
JWK object, with deep copies of its parameter registry, for every
ephemeral key) against about 0.1 ms for the primitives. Only RFC 7516/7518's
JSON serialization for the two key algorithms and the one content algorithm
that ocicrypt uses is written by hand; a JWE with anything else in it
(`crit`, `aad`, shared unprotected headers, other algorithms, unusual
encodings) is opened by jwcrypto as before. tests/crypto/test_crypto_keywrap.py
checks both directions against independent computations and jwcrypto.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)
from jwcrypto import jwe
from jwcrypto.common import JWException, base64url_decode, base64url_encode, json_encode

from trustplane.crypto.keys import RecipientKey, UnwrapKey
from trustplane.errors import IntegrityError, MalformedError

CONTENT_ALG = "A256GCM"
KEY_ALGS = ("RSA-OAEP", "ECDH-ES+A256KW")
MAX_JWE_SIZE = 1 << 20
"""A JWE for a few recipients is a few KB; refuse absurd input before parsing."""
CEK_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16
_PROTECTED = base64url_encode(json_encode({"enc": CONTENT_ALG}))
# RSA-OAEP is SHA-1 by definition (RFC 7518 4.3), as go-jose and ocicrypt use it.
_OAEP = padding.OAEP(
    mgf=padding.MGF1(hashes.SHA1()),  # noqa: S303
    algorithm=hashes.SHA1(),  # noqa: S303
    label=None,
)
_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_CURVE_NAMES = {curve.name: name for name, curve in _CURVES.items()}
_FAST_MEMBERS = {"protected", "header", "encrypted_key", "recipients", "iv", "ciphertext", "tag"}
_FAST_HEADERS = {"alg", "enc", "kid", "epk", "apu", "apv"}


@dataclass(frozen=True)
class WrappedFor:
    """One recipient of a JWE as seen without any key: algorithm, key id, curve."""

    alg: str
    kid: str | None
    curve: str | None


def wrap(payload: bytes, recipients: Sequence[RecipientKey]) -> str:
    """Encrypt `payload` to every recipient; returns the JWE JSON serialization.

    The same document jwcrypto writes: protected header `{"enc":"A256GCM"}`,
    each recipient's `alg`, `kid` (and `epk`) in its unprotected header,
    members in sorted order; flattened for one recipient, general for more.
    """
    if not recipients:
        raise ValueError("a JWE needs at least one recipient")
    cek = os.urandom(CEK_BYTES)
    iv = os.urandom(IV_BYTES)
    entries = [_wrap_cek(cek, recipient) for recipient in recipients]
    sealed = AESGCM(cek).encrypt(iv, payload, _PROTECTED.encode("ascii"))
    document: dict[str, Any] = {
        "protected": _PROTECTED,
        "iv": base64url_encode(iv),
        "ciphertext": base64url_encode(sealed[:-TAG_BYTES]),
        "tag": base64url_encode(sealed[-TAG_BYTES:]),
    }
    if len(entries) == 1:
        document.update(entries[0])
    else:
        document["recipients"] = entries
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def _wrap_cek(cek: bytes, recipient: RecipientKey) -> dict[str, Any]:
    """One recipient's header and encrypted key (RFC 7518 4.3 and 4.6)."""
    public = recipient.jwk.get_op_key("wrapKey")
    header: dict[str, Any] = {"alg": recipient.alg, "kid": recipient.kid}
    if isinstance(public, rsa.RSAPublicKey):
        encrypted = public.encrypt(cek, _OAEP)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        ephemeral = ec.generate_private_key(public.curve)
        kek = _ecdh_kek(ephemeral, public, recipient.alg, b"", b"")
        encrypted = aes_key_wrap(kek, cek)
        header["epk"] = _public_jwk(ephemeral.public_key())
    else:  # load_recipient_key admits nothing else
        raise ValueError(f"{recipient.source}: not an RSA or EC key")
    return {"header": header, "encrypted_key": base64url_encode(encrypted)}


def _public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    size = (key.curve.key_size + 7) // 8
    numbers = key.public_numbers()
    return {
        "crv": _CURVE_NAMES[key.curve.name],
        "kty": "EC",
        "x": base64url_encode(numbers.x.to_bytes(size, "big")),
        "y": base64url_encode(numbers.y.to_bytes(size, "big")),
    }


def _ecdh_kek(
    private: ec.EllipticCurvePrivateKey,
    public: ec.EllipticCurvePublicKey,
    alg: str,
    apu: bytes,
    apv: bytes,
) -> bytes:
    """ECDH-ES key agreement and Concat KDF (RFC 7518 4.6.2) for an A256KW key."""
    shared = private.exchange(ec.ECDH(), public)
    name = alg.encode("ascii")
    other = (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">I", len(apu))
        + apu
        + struct.pack(">I", len(apv))
        + apv
        + struct.pack(">I", CEK_BYTES * 8)
    )
    return ConcatKDFHash(algorithm=hashes.SHA256(), length=CEK_BYTES, otherinfo=other).derive(
        shared
    )


def recipients_of(serialized: str) -> list[WrappedFor]:
    """Who a JWE is for, read from its headers alone."""
    document = _parse(serialized)
    protected = _protected_header(document)
    result = []
    for entry in document.get("recipients", [document]):
        header = {**protected, **_as_object(entry.get("header", {}), "recipient header")}
        epk = header.get("epk")
        curve = epk.get("crv") if isinstance(epk, dict) else None
        result.append(WrappedFor(alg=str(header.get("alg")), kid=header.get("kid"), curve=curve))
    return result


def unwrap(serialized: str, keys: Sequence[UnwrapKey], what: str) -> bytes | None:
    """The payload, or None when no key is a recipient.

    Raises IntegrityError when a key *is* a recipient (its kid is named, or it
    unwrapped the content key) but authentication of the JWE fails.
    """
    document = _parse(serialized)
    header = _protected_header(document)
    if header.get("enc") != CONTENT_ALG or "zip" in header:
        raise MalformedError(f"{what}: JWE must use enc={CONTENT_ALG} without compression")
    named = {wrapped.kid for wrapped in recipients_of(serialized)}
    fast = _fast_form(document, header)
    for key in keys:
        if fast is None:
            payload, tag_failed = _open_with_jwcrypto(serialized, key)
        else:
            payload, tag_failed = _open_direct(fast, key)
        if payload is not None:
            return payload
        # The content key unwrapped but GCM failed: this key is a recipient
        # and the JWE's content or protected header was altered.
        if key.kid in named or tag_failed:
            raise IntegrityError(
                f"{what}: the key wrapping (JWE) for {key.source} fails authentication; "
                "the annotation was altered"
            )
    return None


def _open_with_jwcrypto(serialized: str, key: UnwrapKey) -> tuple[bytes | None, bool]:
    token = jwe.JWE()
    token.allowed_algs = [*KEY_ALGS, CONTENT_ALG]
    try:
        token.deserialize(serialized, key.jwk)
    except JWException:
        log = " ".join(str(entry) for entry in token.decryptlog or [])
        return None, "InvalidTag" in log
    payload: bytes = token.payload
    return payload, False


@dataclass(frozen=True)
class _FastJwe:
    """A JWE in the plain shape (what ocicrypt, skopeo and `wrap` write)."""

    aad: bytes
    iv: bytes
    sealed: bytes
    recipients: list[tuple[dict[str, Any], bytes]]
    """(merged header, encrypted key) per recipient."""


def _fast_form(document: dict[str, Any], protected: dict[str, Any]) -> _FastJwe | None:
    """The JWE's parts when every one of them is of the plain shape, else None
    (and jwcrypto decides)."""
    try:
        if not set(document) <= _FAST_MEMBERS:
            return None
        raw = document["protected"]
        if base64url_encode(base64url_decode(raw)) != raw:
            return None  # jwcrypto authenticates the re-encoded header
        entries = document.get("recipients")
        if entries is None:
            entries = [{k: document[k] for k in ("header", "encrypted_key") if k in document}]
        elif "header" in document or "encrypted_key" in document:
            return None
        recipients = []
        for entry in entries:
            if not set(entry) <= {"header", "encrypted_key"}:
                return None
            own = entry.get("header", {})
            if not isinstance(own, dict) or set(own) & set(protected):
                return None
            merged = {**protected, **own}
            if not set(merged) <= _FAST_HEADERS or merged.get("alg") not in KEY_ALGS:
                return None
            if merged["alg"] == "ECDH-ES+A256KW" and not _plain_epk(merged.get("epk")):
                return None
            if not all(isinstance(merged.get(k, ""), str) for k in ("apu", "apv", "kid")):
                return None
            encrypted_key = entry.get("encrypted_key", "")
            if not isinstance(encrypted_key, str):
                return None
            recipients.append((merged, base64url_decode(encrypted_key)))
        iv = base64url_decode(document["iv"])
        tag = base64url_decode(document["tag"])
        ciphertext = base64url_decode(document["ciphertext"])
    except Exception:  # any oddity: jwcrypto reads it and decides
        return None
    if len(iv) != IV_BYTES or len(tag) != TAG_BYTES:
        return None
    return _FastJwe(raw.encode("ascii"), iv, ciphertext + tag, recipients)


def _plain_epk(epk: Any) -> bool:
    return (
        isinstance(epk, dict)
        and set(epk) == {"kty", "crv", "x", "y"}
        and epk["kty"] == "EC"
        and epk["crv"] in _CURVES
        and isinstance(epk["x"], str)
        and isinstance(epk["y"], str)
    )


def _open_direct(jwe_: _FastJwe, key: UnwrapKey) -> tuple[bytes | None, bool]:
    """As jwcrypto decides for one key: the payload from the first recipient
    entry that opens, else whether some entry's content key unwrapped but
    GCM failed."""
    private = key.jwk.get_op_key("unwrapKey")
    tag_failed = False
    for header, encrypted_key in jwe_.recipients:
        cek = _unwrap_cek(private, header, encrypted_key)
        if cek is None:
            continue
        try:
            return AESGCM(cek).decrypt(jwe_.iv, jwe_.sealed, jwe_.aad), False
        except InvalidTag:
            tag_failed = True
    return None, tag_failed


def _unwrap_cek(private: object, header: dict[str, Any], encrypted_key: bytes) -> bytes | None:
    """The content key this entry wraps for `private`, or None if it is not for it."""
    try:
        if header["alg"] == "RSA-OAEP":
            if not isinstance(private, rsa.RSAPrivateKey):
                return None
            cek = private.decrypt(encrypted_key, _OAEP)
        else:
            if not isinstance(private, ec.EllipticCurvePrivateKey):
                return None
            epk = header["epk"]
            curve = _CURVES[epk["crv"]]
            if curve.name != private.curve.name:
                return None
            ephemeral = ec.EllipticCurvePublicNumbers(
                int.from_bytes(base64url_decode(epk["x"]), "big"),
                int.from_bytes(base64url_decode(epk["y"]), "big"),
                curve,
            ).public_key()  # checks that the point is on the curve
            kek = _ecdh_kek(
                private,
                ephemeral,
                header["alg"],
                base64url_decode(header.get("apu", "")),
                base64url_decode(header.get("apv", "")),
            )
            cek = aes_key_unwrap(kek, encrypted_key)
    except (InvalidUnwrap, ValueError):
        return None
    return cek if len(cek) == CEK_BYTES else None


def _parse(serialized: str) -> dict[str, Any]:
    if len(serialized) > MAX_JWE_SIZE:
        raise MalformedError("JWE is larger than 1 MiB")
    try:
        document = json.loads(serialized)
    except json.JSONDecodeError:
        raise MalformedError("JWE is not valid JSON") from None
    document = _as_object(document, "JWE")
    recipients = document.get("recipients", [document])
    if not isinstance(recipients, list) or not recipients:
        raise MalformedError("JWE has no recipients")
    for entry in recipients:
        _as_object(entry, "JWE recipient")
    return document


def _protected_header(document: dict[str, Any]) -> dict[str, Any]:
    raw = document.get("protected")
    if not isinstance(raw, str):
        raise MalformedError("JWE has no protected header")
    try:
        return _as_object(json.loads(base64url_decode(raw)), "JWE protected header")
    except (ValueError, UnicodeDecodeError):
        raise MalformedError("JWE protected header is not base64url JSON") from None


def _as_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedError(f"{what} is not a JSON object")
    return value
