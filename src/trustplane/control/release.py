"""What every release of key material shares: the decision, its log entry, the attestation gate.

A release (a secret's payload, a layer's key options) is decided first and
logged before anything is handed out: a `Release` holds the log entry and
either what the caller gets or the error it gets, raised only after the
entry is committed, so a refusal is as durable as a release. An allowing
policy rule that requires attestation allows only what the attestation
gate allows too; without a gate it denies (fail closed).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from trustplane.control.identity import Principal
from trustplane.control.policy import Decision

T = TypeVar("T")
Authorize = Callable[[Principal, str, str, int | None], Decision]
AttestationGate = Callable[[Principal, str | None, int | None, str | None], Decision]
"""(caller, image repository, layer index, transport key PEM) -> may it have keys?"""
CertifiedTransport = Callable[[str], str | None]
"""node name -> the transport key PEM its TPM certified at enrolment (None: not enrolled)."""


class Uncached(Exception):
    """The answer needs a database read (raised only when none may be made)."""


@dataclass(frozen=True)
class Release(Generic[T]):
    """A decision before it is logged: the log entry, then the value or the error."""

    kind: str
    entry: dict[str, Any]
    value: T | None
    error: Exception | None = None

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


class Gate:
    """The attestation gate over policy decisions (control/attestation.py's `Verifier.gate`)."""

    def __init__(
        self, check: AttestationGate | None, certified: CertifiedTransport | None = None
    ) -> None:
        self.check = check
        self.certified = certified

    def __call__(
        self,
        decision: Decision,
        principal: Principal,
        repository: str | None,
        layer: int | None,
        transport_pem: str | None,
    ) -> Decision:
        """`decision`, narrowed by the gate when its rule requires attestation."""
        if not (decision.allowed and decision.require_attestation):
            return decision
        if self.check is None:
            return Decision(False, f"{decision.reason}, but no attestation verifier is configured")
        gate = self.check(principal, repository, layer, transport_pem)
        if not gate.allowed:
            return Decision(False, f"{decision.reason}; {gate.reason}")
        return Decision(True, f"{decision.reason}; {gate.reason}")

    def transport(self, principal: Principal, transport_pem: str) -> Decision:
        """May key material for `principal` be wrapped to `transport_pem`, whatever
        the rule says about attestation? A node whose TPM certified a transport key
        at enrolment gets keys wrapped to that key only (a stolen node token with a
        key of the thief's own gets nothing); a node never enrolled, and a user, to
        the key it sends (the answer then opens only in that caller's memory)."""
        if principal.kind != "node" or self.certified is None:
            return Decision(True, "transport key of the caller's own")
        try:
            certified = self.certified(principal.name)
        except Exception as exc:  # fail closed, as the gate does
            return Decision(False, f"transport key check failed ({type(exc).__name__})")
        if certified is None:
            return Decision(True, "node not enrolled: transport key of its own")
        if not hmac.compare_digest(certified.encode(), transport_pem.encode()):
            return Decision(False, "transport key not certified by the TPM")
        return Decision(True, "transport key certified by the TPM")
