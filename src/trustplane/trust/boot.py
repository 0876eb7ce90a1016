"""Boot continuity: what the verifier remembers of a node's TPM between quotes.

A quote carries the TPM's clock information: `resetCount` (TPM resets:
every boot, and every resume from hibernation, since the TPM cannot tell
one from the other), `restartCount` (TPM restarts and resumes since the
last reset) and `clock` (milliseconds the TPM has been powered). The agent's
AK is a primary key of the endorsement hierarchy, whose quotes carry these
in the clear (keys of other hierarchies get per-key offsets).

While both counters stay the same the node has not rebooted, so its
measurement PCR (one of 0-15) has only been extended since the last quote:
the event log the node sends must extend the one accepted before (which is
kept as a count and a hash chain over its events) and the clock must not
go back. A log that is shorter, reordered or started again with the same
counters, or counters that go back, is tampering. Counters that move on are
a new boot (or a TPM restart): a new log starts, which must replay from
zeros like any log.

Pure logic, no I/O: the control plane stores the record (`BootRecord`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from trustplane.errors import IntegrityError
from trustplane.trust.attestation import Event
from trustplane.trust.tpm import Quote

EMPTY_LOG = bytes(32)


class Tampering(IntegrityError):
    """The node's evidence contradicts what it showed before in the same boot."""


@dataclass(frozen=True)
class BootRecord:
    """The verifier's memory of one node's current boot."""

    reset_count: int
    restart_count: int
    clock: int
    """The TPM clock (ms) of the last accepted quote."""
    events: int
    """How many events the accepted log held."""
    digest: bytes
    """`log_digest` of those events."""
    pcrs: tuple[int, ...]
    """The PCRs that log was quoted over (a changed selection starts a new log)."""
    reviewed: int = 0
    """Events at the start of this boot's log that an administrator reviewed
    when clearing the node (they are not checked against references again)."""


def log_digest(events: Sequence[Event], start: bytes = EMPTY_LOG) -> bytes:
    """A hash chain over the events: d(k+1) = SHA-256(d(k) || canonical JSON of event k).

    Equal digests mean equal logs in equal order, so a stored count and
    digest are enough to check that a new log extends the accepted one.
    """
    digest = start
    for event in events:
        digest = hashlib.sha256(digest + event.canonical()).digest()
    return digest


def continue_boot(
    record: BootRecord | None, quote: Quote, events: Sequence[Event], pcrs: tuple[int, ...]
) -> BootRecord:
    """The record after accepting `events` with `quote`; `Tampering` when
    they cannot follow `record`. (Whether the log replays to the quoted PCR
    is `attestation.check_event_log`'s question, asked separately.)"""
    counters = (quote.reset_count, quote.restart_count)
    pcrs = tuple(sorted(set(pcrs)))
    kept = 0 if record is None else min(record.events, len(events))
    prefix = log_digest(events[:kept])
    fresh = BootRecord(
        reset_count=quote.reset_count,
        restart_count=quote.restart_count,
        clock=quote.clock,
        events=len(events),
        digest=log_digest(events[kept:], prefix),
        pcrs=pcrs,
    )
    if record is None or record.pcrs != pcrs:
        return fresh
    known = (record.reset_count, record.restart_count)
    if counters < known:
        raise Tampering(
            f"tampering: the TPM's reset/restart counts went back from {known[0]}/{known[1]} "
            f"to {counters[0]}/{counters[1]} (a quote from an earlier boot, or TPM state "
            "rolled back)"
        )
    if counters != known:
        return fresh  # a reboot (or TPM restart): a new log
    if quote.clock < record.clock:
        raise Tampering(
            f"tampering: the TPM clock went back within one boot ({record.clock} ms to "
            f"{quote.clock} ms)"
        )
    if len(events) < record.events:
        raise Tampering(
            f"tampering: the event log holds {len(events)} events, fewer than the "
            f"{record.events} accepted earlier in this boot (evidence was removed)"
        )
    if prefix != record.digest:
        raise Tampering(
            f"tampering: the event log does not extend the one accepted earlier in this boot "
            f"(its first {record.events} events were changed, reordered or started again)"
        )
    return replace(fresh, reviewed=record.reviewed)
