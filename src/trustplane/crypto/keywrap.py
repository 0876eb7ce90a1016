"""Wrapping a layer's private options to recipients with JWE, as ocicrypt does.

Content encryption is A256GCM; each recipient's key wraps the content key
with RSA-OAEP (SHA-1, as go-jose and ocicrypt use) or ECDH-ES+A256KW. One
recipient gives a flattened JSON JWE, several the general form; each
recipient header carries `alg` and, beyond what ocicrypt writes, the
recipient's RFC 7638 thumbprint as `kid` (go-jose ignores it), so that
`image inspect` can say who can open a layer and a failed unwrap for a
named recipient is reported as tampering rather than as "not for you".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jwcrypto import jwe
from jwcrypto.common import JWException, base64url_decode, json_encode

from trustplane.crypto.keys import RecipientKey, UnwrapKey
from trustplane.errors import IntegrityError, MalformedError

CONTENT_ALG = "A256GCM"
KEY_ALGS = ("RSA-OAEP", "ECDH-ES+A256KW")
MAX_JWE_SIZE = 1 << 20
"""A JWE for a few recipients is a few KB; refuse absurd input before parsing."""


@dataclass(frozen=True)
class WrappedFor:
    """One recipient of a JWE as seen without any key: algorithm, key id, curve."""

    alg: str
    kid: str | None
    curve: str | None


def wrap(payload: bytes, recipients: Sequence[RecipientKey]) -> str:
    """Encrypt `payload` to every recipient; returns the JWE JSON serialization."""
    if not recipients:
        raise ValueError("a JWE needs at least one recipient")
    token = jwe.JWE(payload, protected=json_encode({"enc": CONTENT_ALG}))
    for recipient in recipients:
        token.add_recipient(
            recipient.jwk, header=json_encode({"alg": recipient.alg, "kid": recipient.kid})
        )
    serialized: str = token.serialize(compact=False)
    return serialized


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
    for key in keys:
        token = jwe.JWE()
        token.allowed_algs = [*KEY_ALGS, CONTENT_ALG]
        try:
            token.deserialize(serialized, key.jwk)
        except JWException:
            log = " ".join(str(entry) for entry in token.decryptlog or [])
            # The content key unwrapped but GCM failed: this key is a recipient
            # and the JWE's content or protected header was altered.
            if key.kid in named or "InvalidTag" in log:
                raise IntegrityError(
                    f"{what}: the key wrapping (JWE) for {key.source} fails authentication; "
                    "the annotation was altered"
                ) from None
            continue
        payload: bytes = token.payload
        return payload
    return None


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
