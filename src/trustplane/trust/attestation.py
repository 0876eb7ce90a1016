"""Quote verification: signature, AK, nonce, event-log replay, PCR digest.

The node's agent extends each measured digest (32 raw bytes of a sha256
digest) into one PCR of the sha256 bank and records the extension in its
event log. The verifier replays the log from the PCR's reset value (zeros)
and accepts the log only when the replayed values hash to the quoted PCR
digest, in a quote signed by the node's bound AK over the verifier's nonce.
Fails closed: any error in here is a failed attestation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any

from trustplane.errors import IntegrityError, MalformedError, TrustplaneError
from trustplane.trust import tpm

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
KINDS = ("blob", "diff_id")
MAX_EVENTS = 100_000


@dataclass(frozen=True)
class Event:
    """One extension of a PCR: which digest, and what it measured."""

    pcr: int
    digest: str
    """`sha256:<hex>`; the 32 raw bytes are what was extended."""
    image: str
    """Repository of the image the layer belongs to."""
    manifest: str
    layer: int
    kind: str
    """`blob` (compressed layer, plain) or `diff_id` (uncompressed)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "pcr": self.pcr,
            "digest": self.digest,
            "image": self.image,
            "manifest": self.manifest,
            "layer": self.layer,
            "kind": self.kind,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Event:
        if not isinstance(raw, dict):
            raise MalformedError("an event-log entry must be an object")
        try:
            event = cls(
                pcr=int(raw["pcr"]),
                digest=str(raw["digest"]),
                image=str(raw["image"]),
                manifest=str(raw["manifest"]),
                layer=int(raw["layer"]),
                kind=str(raw["kind"]),
            )
        except (KeyError, TypeError, ValueError):
            raise MalformedError("an event-log entry lacks pcr/digest/image/layer/kind") from None
        if not 0 <= event.pcr < 24:
            raise MalformedError(f"event-log PCR {event.pcr} out of range")
        if not _DIGEST.match(event.digest) or event.kind not in KINDS or event.layer < 0:
            raise MalformedError("an event-log entry has a bad digest, kind or layer")
        return event


def extend(value: bytes, event_digest: str) -> bytes:
    """PCR_Extend in the sha256 bank: new = sha256(old || digest bytes)."""
    return hashlib.sha256(value + bytes.fromhex(event_digest.split(":", 1)[1])).digest()


def replay(events: list[Event]) -> dict[int, bytes]:
    """The sha256 PCR values the log claims, from zeros."""
    values: dict[int, bytes] = {}
    for event in events:
        values[event.pcr] = extend(values.get(event.pcr, b"\0" * 32), event.digest)
    return values


@dataclass(frozen=True)
class VerifiedQuote:
    quote: tpm.Quote
    events: tuple[Event, ...]


def verify_quote(
    ak_public: bytes,
    attest: bytes,
    signature: bytes,
    nonce: bytes,
    events: list[Event],
    pcrs: tuple[int, ...],
) -> VerifiedQuote:
    """Check a quote end to end; raise IntegrityError (or another expected
    error) with the reason when anything does not hold.

    `pcrs` are the PCRs the verifier asked for: the quote must select exactly
    those in the sha256 bank, and the event log may extend no other.
    """
    try:
        return _verify(ak_public, attest, signature, nonce, events, pcrs)
    except TrustplaneError:
        raise
    except Exception as exc:  # fail closed on anything unforeseen
        raise IntegrityError(f"quote verification failed ({type(exc).__name__})") from None


def _verify(
    ak_public: bytes,
    attest: bytes,
    signature: bytes,
    nonce: bytes,
    events: list[Event],
    pcrs: tuple[int, ...],
) -> VerifiedQuote:
    if len(events) > MAX_EVENTS:
        raise MalformedError("the event log is too long")
    ak = tpm.parse_public(ak_public)
    tpm.check_ak(ak)
    hash_alg = tpm.verify_signature(ak, attest, signature)
    quote = tpm.parse_quote(attest)
    if quote.qualified_signer[:2] != ak.name[:2] or len(quote.qualified_signer) != len(ak.name):
        raise IntegrityError("the quote's signer is not a key like the AK")
    if not hmac.compare_digest(quote.extra_data, nonce):
        raise IntegrityError("the quote does not carry the nonce issued for it (stale or replayed)")
    wanted = tuple(sorted(set(pcrs)))
    if quote.pcr_selection != ((tpm.ALG_SHA256, wanted),):
        raise IntegrityError(f"the quote does not select exactly sha256 PCRs {list(wanted)}")
    stray = {event.pcr for event in events} - set(wanted)
    if stray:
        raise IntegrityError(f"the event log extends PCRs that were not quoted: {sorted(stray)}")
    values = replay(events)
    expected = tpm.pcr_digest(hash_alg, [values.get(pcr, b"\0" * 32) for pcr in wanted])
    if not hmac.compare_digest(expected, quote.pcr_digest):
        raise IntegrityError("the event log does not replay to the quoted PCR digest")
    return VerifiedQuote(quote=quote, events=tuple(events))
