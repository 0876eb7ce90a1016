"""Who is calling: passwords, signed tokens, node assertions.

Tokens are short-lived ES256 JWTs signed by a key the replicas share (kept
sealed in the database). Verifying one costs an ECDSA verification, so
verified tokens are cached until they expire; the cache holds only what the
signature already vouched for.

Nodes have no password: they sign a short-lived assertion (RFC 7523 JWT
bearer grant, crypto/node_assertion.py) with their own key, registered by an
administrator; it is checked here, and each assertion can be used once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from jwcrypto import jwk, jwt
from jwcrypto.common import JWException

from trustplane.crypto.node_assertion import ALGORITHMS
from trustplane.errors import AuthError

Role = Literal["admin", "operator", "user", "node"]
ROLES: tuple[Role, ...] = ("admin", "operator", "user", "node")
USER_ROLES: tuple[Role, ...] = ("admin", "operator", "user")
ISSUER = "trustplane"
ASSERTION_MAX_LIFETIME = 300
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller, as the policy and the log name it."""

    kind: Literal["user", "node"]
    name: str
    role: Role
    scopes: frozenset[str]
    token_id: str = ""
    gateways: frozenset[str] | None = None
    """Edge gateways (node names) this token is valid on; None: not scoped to any."""
    issued_at: float = 0.0
    expires_at: float = 0.0
    """The token's `iat` and `exp` (revocations name tokens by id or issue time)."""

    @property
    def subject(self) -> str:
        return f"{self.kind}:{self.name}"


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), dklen=32, **_SCRYPT)
    return hmac.compare_digest(digest, bytes.fromhex(digest_hex))


def new_password() -> str:
    return secrets.token_urlsafe(18)


class TokenAuthority:
    """Issues and verifies access tokens."""

    def __init__(self, key: jwk.JWK, ttl_seconds: int, audience: str, cache_size: int = 65536):
        self._key = key
        self._public = jwk.JWK.from_json(key.export_public())
        self.ttl = ttl_seconds
        self.audience = audience
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def jwks(self) -> dict[str, Any]:
        public: dict[str, Any] = json.loads(self._key.export_public())
        public.update(kid=self._key.thumbprint(), use="sig", alg="ES256")
        return {"keys": [public]}

    def issue(self, principal: Principal) -> tuple[str, int]:
        issued = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": self.audience,
            "sub": principal.subject,
            "role": principal.role,
            "scope": " ".join(sorted(principal.scopes)),
            "iat": issued,
            "exp": issued + self.ttl,
            "jti": str(uuid.uuid4()),
        }
        if principal.gateways is not None:
            claims["gateways"] = sorted(principal.gateways)
        token = jwt.JWT(header={"alg": "ES256", "kid": self._key.thumbprint()}, claims=claims)
        token.make_signed_token(self._key)
        return token.serialize(), self.ttl

    def verify(self, token: str) -> Principal:
        now = time.time()
        with self._lock:
            cached = self._cache.get(token)
            if cached is not None:
                if cached[0] > now:
                    self._cache.move_to_end(token)
                    return cached[1]
                del self._cache[token]
        try:
            parsed = jwt.JWT(
                jwt=token,
                key=self._public,
                algs=["ES256"],
                check_claims={"iss": ISSUER, "aud": self.audience, "exp": None},
            )
            claims = json.loads(parsed.claims)
        except (JWException, ValueError, TypeError):
            raise AuthError("the access token is invalid or expired") from None
        principal = _principal_from_claims(claims)
        with self._lock:
            self._cache[token] = (float(claims["exp"]), principal)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal


def _principal_from_claims(claims: dict[str, Any]) -> Principal:
    kind, _, name = str(claims.get("sub", "")).partition(":")
    role = claims.get("role")
    if kind not in ("user", "node") or not name or role not in ROLES:
        raise AuthError("the access token names no valid principal")
    gateways = claims.get("gateways")
    if gateways is not None and (
        not isinstance(gateways, list) or not all(isinstance(g, str) for g in gateways)
    ):
        raise AuthError("the access token's gateways claim is malformed")
    return Principal(
        kind=kind,  # type: ignore[arg-type]
        name=name,
        role=role,
        scopes=frozenset(str(claims.get("scope", "")).split()),
        token_id=str(claims.get("jti", "")),
        gateways=frozenset(gateways) if gateways is not None else None,
        issued_at=float(claims.get("iat", 0)),
        expires_at=float(claims.get("exp", 0)),
    )


def verify_node_assertion(
    assertion: str, public_key_pem: str, node: str, audience: str | list[str]
) -> str:
    """Check a node's signed assertion; returns its jti (for the replay check)."""
    try:
        key = jwk.JWK.from_pem(public_key_pem.encode())
        parsed = jwt.JWT(
            jwt=assertion,
            key=key,
            algs=list(ALGORITHMS),
            check_claims={"iss": node, "sub": node, "aud": audience, "exp": None, "jti": None},
        )
        claims = json.loads(parsed.claims)
    except (JWException, ValueError, TypeError):
        raise AuthError(
            f"node {node}: the assertion is invalid, expired or not signed by its key"
        ) from None
    lifetime = int(claims["exp"]) - int(claims.get("iat", claims["exp"]))
    if lifetime > ASSERTION_MAX_LIFETIME:
        raise AuthError(f"node {node}: assertions may live at most {ASSERTION_MAX_LIFETIME} s")
    return str(claims["jti"])
