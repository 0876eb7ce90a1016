"""Tokens scoped to edge gateways: the claim round-trips, and a malformed one is refused."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from jwcrypto import jwk, jwt

from trustplane.control.identity import ISSUER, Principal, TokenAuthority
from trustplane.errors import AuthError

ALICE = Principal("user", "alice", "operator", frozenset({"images"}))


def test_the_gateways_claim_round_trips_and_is_absent_when_unscoped() -> None:
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    authority = TokenAuthority(key, 60, "trustplane")
    scoped, _ = authority.issue(dataclasses.replace(ALICE, gateways=frozenset({"gw-2", "gw-1"})))
    assert authority.verify(scoped).gateways == frozenset({"gw-1", "gw-2"})
    claims = json.loads(jwt.JWT(jwt=scoped, key=key).claims)
    assert claims["gateways"] == ["gw-1", "gw-2"]
    unscoped, _ = authority.issue(ALICE)
    assert authority.verify(unscoped).gateways is None
    assert "gateways" not in json.loads(jwt.JWT(jwt=unscoped, key=key).claims)


@pytest.mark.parametrize("bad", ["gw-1", [1, 2], {"gw-1": True}])
def test_a_malformed_gateways_claim_is_refused(bad: object) -> None:
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    authority = TokenAuthority(key, 60, "trustplane")
    now = int(time.time())
    token = jwt.JWT(
        header={"alg": "ES256"},
        claims={
            "iss": ISSUER,
            "aud": "trustplane",
            "sub": "user:alice",
            "role": "operator",
            "scope": "images",
            "iat": now,
            "exp": now + 60,
            "gateways": bad,
        },
    )
    token.make_signed_token(key)
    with pytest.raises(AuthError, match="gateways claim is malformed"):
        authority.verify(token.serialize())
