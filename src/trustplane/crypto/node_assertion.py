"""The signed node assertion (RFC 7523, JWT bearer grant), made once for every node.

A node (host agent or edge gateway) has no password: it signs a short-lived
assertion (`iss` = `sub` = its name, `aud` = the control plane's token URL, a
unique `jti`) with its own key, registered by an administrator, and trades
it for a token (client.py). The control plane checks it
(control/identity.py) against the algorithms listed here, so a key either
works on every side or is refused with the same one line wherever it is
loaded: the agent, the gateway, the demo.
"""

from __future__ import annotations

import time
import uuid

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto import jwk, jwt

from trustplane.errors import DecryptionKeyError, MalformedError, UnsupportedError

ASSERTION_LIFETIME = 60
"""Seconds an assertion is valid: it is made for one exchange, at once."""
ALGORITHMS = ("ES256", "ES384", "ES512", "EdDSA", "RS256", "PS256")
"""What an assertion may be signed with (the verifier's list)."""
SUPPORTED = "EC P-256, P-384 or P-521, Ed25519, or RSA"
_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def load_node_key(pem: bytes, source: str) -> jwk.JWK:
    """A node's private key (PEM), refused now if it cannot sign assertions."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise DecryptionKeyError(f"{source}: the private key is encrypted") from None
    except ValueError:
        raise MalformedError(f"{source}: not a PEM private key") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, _EC_CURVES):
        pass
    elif not isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise UnsupportedError(
            f"{source}: {_describe(key)} cannot sign node assertions; use {SUPPORTED}"
        )
    return jwk.JWK.from_pyca(key)


def signing_alg(key: jwk.JWK) -> str:
    """The JWS algorithm for a node key: its curve decides for EC, EdDSA for Ed25519."""
    kty, crv = key.get("kty"), key.get("crv")
    if kty == "RSA":
        return "RS256"
    if kty == "OKP" and crv == "Ed25519":
        return "EdDSA"
    if kty == "EC" and crv in _CURVES:
        return _CURVES[str(crv)]
    shown = f"a {kty} key" + (f" on curve {crv}" if crv else "")
    raise UnsupportedError(f"node key: {shown} cannot sign node assertions; use {SUPPORTED}")


def make_node_assertion(
    key: jwk.JWK, node: str, audience: str, lifetime: int = ASSERTION_LIFETIME
) -> str:
    """A fresh, single-use assertion by `node` for the control plane at `audience`."""
    issued = int(time.time())
    token = jwt.JWT(
        header={"alg": signing_alg(key)},
        claims={
            "iss": node,
            "sub": node,
            "aud": audience,
            "iat": issued,
            "exp": issued + lifetime,
            "jti": str(uuid.uuid4()),
        },
    )
    token.make_signed_token(key)
    serialized: str = token.serialize()
    return serialized


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on curve {key.curve.name}"
    kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey")
    return f"an {kind} key" if kind[:1] in "AEIOU" else f"a {kind} key"
