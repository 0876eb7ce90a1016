"""The attach key release wrapped to the caller's transport key (a JWE), as layer keys are.

A node sends its transport public key with the attach; the answer carries
the volume key only as a JWE to that key (crypto/keywrap, as the KMS answers
an unwrap), so a TLS-terminating proxy, a log of the HTTP body or a captured
response holds nothing that opens the volume. Which key a node may name is
decided by release.py's `Gate`: the attestation gate when the policy rule
requires attestation, and always the key its TPM certified at enrolment
once it enrolled one (a stolen node token with a key of its own gets
nothing). A node that sends no transport key gets no key. A user may still
receive the raw key (operators attaching from their workstation) or name a
transport key of its own to get a JWE.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustplane.control.identity import Principal
from trustplane.control.release import Gate
from trustplane.crypto import keywrap
from trustplane.crypto.keys import RecipientKey, load_recipient_key
from trustplane.errors import Forbidden, MalformedError, TrustplaneError, UnsupportedError


@dataclass(frozen=True)
class Refusal:
    reason: str
    error: TrustplaneError


def transport_for(
    gate: Gate, principal: Principal, transport_pem: str | None
) -> RecipientKey | Refusal | None:
    """The key to wrap the release to (None: raw, users only), or why not."""
    if transport_pem is None:
        if principal.kind == "node":
            why = "a node receives volume keys only wrapped to its transport key"
            return Refusal(why, Forbidden(f"{why}; send it with the attach"))
        return None
    try:
        transport = load_recipient_key(transport_pem.encode(), "transport key")
    except (MalformedError, UnsupportedError) as exc:
        return Refusal(f"unusable transport key: {exc}", exc)
    decision = gate.transport(principal, transport_pem)
    if not decision.allowed:
        return Refusal(decision.reason, Forbidden(f"volume key refused: {decision.reason}"))
    return transport


def wrap(key: bytes, transport: RecipientKey) -> str:
    """The volume key as a JWE only `transport`'s private key opens."""
    return keywrap.wrap(key, [transport])
