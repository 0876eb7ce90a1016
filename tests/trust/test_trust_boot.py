"""Boot continuity: within one boot a log may only grow and the clock may
not go back; a reboot starts a new log; counters never go back."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from trustplane.trust import tpm
from trustplane.trust.attestation import Event
from trustplane.trust.boot import BootRecord, Tampering, continue_boot, log_digest

MANIFEST = "sha256:" + "cd" * 32
PCRS = (13,)


def event(n: int) -> Event:
    return Event(13, "sha256:" + hashlib.sha256(b"%d" % n).hexdigest(), "repo", MANIFEST, n, "blob")


def quote(clock: int, reset: int = 5, restart: int = 0) -> tpm.Quote:
    return tpm.Quote(
        qualified_signer=b"",
        extra_data=b"",
        clock=clock,
        reset_count=reset,
        restart_count=restart,
        safe=True,
        firmware_version=0,
        pcr_selection=((tpm.ALG_SHA256, PCRS),),
        pcr_digest=b"",
    )


LOG = [event(i) for i in range(4)]


def accepted(events: list[Event] = LOG[:2], clock: int = 1000) -> BootRecord:
    return continue_boot(None, quote(clock), events, PCRS)


def test_the_first_quote_starts_a_record() -> None:
    record = accepted()
    assert (record.reset_count, record.restart_count, record.clock) == (5, 0, 1000)
    assert record.events == 2
    assert record.digest == log_digest(LOG[:2])
    assert record.reviewed == 0


def test_a_log_that_grows_in_the_same_boot_is_accepted() -> None:
    record = continue_boot(accepted(), quote(2000), LOG, PCRS)
    assert record.events == 4
    assert record.digest == log_digest(LOG)
    assert record.clock == 2000
    same = continue_boot(record, quote(2000), LOG, PCRS)  # nothing new, same millisecond
    assert same == record


def test_the_digest_chains_in_parts() -> None:
    assert log_digest(LOG[2:], log_digest(LOG[:2])) == log_digest(LOG)
    assert log_digest([]) == bytes(32)
    assert log_digest(LOG[::-1]) != log_digest(LOG)


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([], "holds 0 events, fewer than the 2"),  # the log was wiped
        (LOG[:1], "fewer than the 2"),  # shortened
        ([LOG[1], LOG[0], *LOG[2:]], "does not extend"),  # reordered
        ([LOG[0], event(9), *LOG[2:]], "does not extend"),  # rewritten
        ([event(7), event(8), event(9)], "does not extend"),  # started again
    ],
)
def test_a_log_that_does_not_extend_the_accepted_one_is_tampering(
    events: list[Event], message: str
) -> None:
    with pytest.raises(Tampering, match=message):
        continue_boot(accepted(), quote(2000), events, PCRS)


def test_the_clock_may_not_go_back_within_a_boot() -> None:
    with pytest.raises(Tampering, match="clock went back"):
        continue_boot(accepted(clock=5000), quote(4999), LOG, PCRS)


def test_a_reboot_starts_a_new_log() -> None:
    record = accepted(LOG)
    rebooted = continue_boot(record, quote(10, reset=6), LOG[:1], PCRS)  # clock may go back too
    assert (rebooted.reset_count, rebooted.events) == (6, 1)
    restarted = continue_boot(record, quote(10, restart=1), [], PCRS)
    assert (restarted.restart_count, restarted.events, restarted.digest) == (1, 0, bytes(32))


def test_counters_that_go_back_are_tampering() -> None:
    record = continue_boot(accepted(), quote(3000, reset=5, restart=2), LOG, PCRS)
    with pytest.raises(Tampering, match="went back"):
        continue_boot(record, quote(9000, reset=4, restart=9), LOG, PCRS)
    with pytest.raises(Tampering, match="went back"):
        continue_boot(record, quote(9000, reset=5, restart=1), LOG, PCRS)


def test_an_administrators_review_lasts_for_the_boot() -> None:
    record = replace(accepted(), reviewed=2)
    assert continue_boot(record, quote(2000), LOG, PCRS).reviewed == 2
    assert continue_boot(record, quote(10, reset=6), [], PCRS).reviewed == 0


def test_another_pcr_selection_starts_a_new_log() -> None:
    record = accepted()
    moved = continue_boot(record, quote(2000), [], (14,))
    assert (moved.pcrs, moved.events) == ((14,), 0)
