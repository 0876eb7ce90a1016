"""Quote verification: signature, AK, nonce, event-log replay, PCR digest.

The node's agent extends each measured digest (32 raw bytes of a sha256
digest) into one PCR of the sha256 bank and records the extension in its
event log. The verifier replays the log from the PCR's reset value (zeros)
and accepts the log only when the replayed values hash to the quoted PCR
digest, in a quote signed by the node's bound AK over the verifier's nonce.

The check has two stages, because their failures mean different things:
`verify_quote_signature` (is this a fresh quote by the node's TPM?) fails
for a replay, a forgery or a misconfiguration; `check_event_log` (does the
node's record explain its PCR?) fails only for a genuine quote whose log
does not hold, which is the node's own evidence against it.
Fails closed: any error in here is a failed attestation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from trustplane.errors import IntegrityError, MalformedError, TrustplaneError, UsageError
from trustplane.trust import tpm

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
KINDS = ("blob", "diff_id")
MAX_EVENTS = 100_000
_T = TypeVar("_T")

DEFAULT_PCR = 13
"""Where layer measurements go. A measurement PCR must be one that nobody on
the node can reset without a reboot: PCRs 0-15 (PCR 16, the debug PCR, and
23, the application PCR, are resettable from locality 0, so any root user
can zero them with `tpm2_pcrreset`; 17-22 belong to dynamic launch). Of
0-15, on Linux (the UAPI group's "Linux TPM PCR Registry"): 0-7 are the
firmware's; 8 and 9 GRUB's (commands, files; the kernel also measures the
initrd into 9); 10 IMA's; 11 systemd-stub's and systemd-pcrphase's; 12
systemd-stub's (command line, credentials, confexts); 14 shim's (MOK
lists); 15 systemd's (machine id, file systems, cryptsetup volume keys).
13 is extended only by systemd-stub, for system extension images that a
unified kernel image loads from the ESP: a GRUB + shim boot (Debian,
Ubuntu, RHEL, Fedora's default) leaves it at zero."""

NON_RESETTABLE_PCRS = range(16)
RESETTABLE_PCRS = (16, 23)


def check_measurement_pcr(pcr: int, *, allow_resettable_for_tests: bool = False) -> None:
    """Refuse a PCR that cannot carry a measurement nobody may erase."""
    if pcr in NON_RESETTABLE_PCRS:
        return
    if pcr in RESETTABLE_PCRS and allow_resettable_for_tests:
        return
    if pcr in RESETTABLE_PCRS:
        raise UsageError(
            f"PCR {pcr} can be reset from locality 0 (tpm2_pcrreset {pcr}) by any root user, "
            f"so measurements in it prove nothing; use one of PCRs 0-15 (default {DEFAULT_PCR}); "
            "a resettable PCR is accepted only by the test-only option"
        )
    raise UsageError(f"PCR {pcr} cannot hold measurements: use one of PCRs 0-15")


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

    def canonical(self) -> bytes:
        """The event as compact JSON with sorted keys: what a log digest hashes."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

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


@dataclass(frozen=True)
class SignedQuote:
    """A quote the node's AK signed over the verifier's nonce (not yet its log)."""

    quote: tpm.Quote
    hash_alg: int
    """The signature's hash algorithm, which also hashes the PCR digest."""


def _fail_closed(what: str, call: Callable[[], _T]) -> _T:
    try:
        return call()
    except TrustplaneError:
        raise
    except Exception as exc:  # fail closed on anything unforeseen
        raise IntegrityError(f"{what} failed ({type(exc).__name__})") from None


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
    signed = verify_quote_signature(ak_public, attest, signature, nonce, pcrs)
    check_event_log(signed, events, pcrs)
    return VerifiedQuote(quote=signed.quote, events=tuple(events))


def verify_quote_signature(
    ak_public: bytes, attest: bytes, signature: bytes, nonce: bytes, pcrs: tuple[int, ...]
) -> SignedQuote:
    """The first stage: a quote by the AK, over `nonce`, of exactly `pcrs`."""
    return _fail_closed(
        "quote verification", lambda: _verify_signature(ak_public, attest, signature, nonce, pcrs)
    )


def check_event_log(signed: SignedQuote, events: list[Event], pcrs: tuple[int, ...]) -> None:
    """The second stage: the event log replays to the quoted PCR digest."""
    _fail_closed("event-log replay", lambda: _check_log(signed, events, pcrs))


def _verify_signature(
    ak_public: bytes, attest: bytes, signature: bytes, nonce: bytes, pcrs: tuple[int, ...]
) -> SignedQuote:
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
    return SignedQuote(quote, hash_alg)


def _check_log(signed: SignedQuote, events: list[Event], pcrs: tuple[int, ...]) -> None:
    if len(events) > MAX_EVENTS:
        raise MalformedError("the event log is too long")
    wanted = tuple(sorted(set(pcrs)))
    stray = {event.pcr for event in events} - set(wanted)
    if stray:
        raise IntegrityError(f"the event log extends PCRs that were not quoted: {sorted(stray)}")
    values = replay(events)
    expected = tpm.pcr_digest(signed.hash_alg, [values.get(pcr, b"\0" * 32) for pcr in wanted])
    if not hmac.compare_digest(expected, signed.quote.pcr_digest):
        raise IntegrityError("the event log does not replay to the quoted PCR digest")
