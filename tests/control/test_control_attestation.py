"""The verifier's memory of each node: boot continuity, sticky quarantine,
the administrator's clear, and the key gate reading them.

A real database (SQLite in a temporary directory) and transparency log; the
node's TPM is a software AK that quotes PCR 13 with whatever clock and
counters the test gives it (the verifier's checks of real swtpm quotes are
in tests/integration/test_attestation*.py)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trust"))
from tpm_helpers import ak_public, attest, sign

from trustplane.control import migrate
from trustplane.control.attestation import Verifier
from trustplane.control.db import Database
from trustplane.control.identity import Principal
from trustplane.control.models import Attestation, Image
from trustplane.control.settings import AttestationSettings, load_settings
from trustplane.control.transparency import TransparencyLog
from trustplane.errors import Forbidden, NotFoundError, UsageError
from trustplane.trust import tpm
from trustplane.trust.attestation import Event, replay
from trustplane.trust.note import NoteSigner

PCR = 13
REPO = "registry.test/shop/app"
MANIFEST = "sha256:" + "ee" * 32
NODE = Principal(kind="node", name="web-1", role="node", scopes=frozenset())
ADMIN = Principal(kind="user", name="admin", role="admin", scopes=frozenset())


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


GOOD = [
    Event(PCR, digest(b"blob0"), REPO, MANIFEST, 0, "blob"),
    Event(PCR, digest(b"diff0"), REPO, MANIFEST, 0, "diff_id"),
]
TAMPERED = Event(PCR, digest(b"evil"), REPO, MANIFEST, 1, "diff_id")
GOOD_1 = Event(PCR, digest(b"diff1"), REPO, MANIFEST, 1, "diff_id")


@dataclass
class SoftNode:
    """The node's TPM: an AK in software, a PCR, a clock and the boot counters."""

    key: ec.EllipticCurvePrivateKey
    pcr_value: bytes = bytes(32)
    clock: int = 1000
    reset_count: int = 1
    restart_count: int = 0

    @property
    def public(self) -> bytes:
        return ak_public(self.key)

    def extend(self, events: list[Event]) -> None:
        value = self.pcr_value
        for item in events:
            value = hashlib.sha256(value + bytes.fromhex(item.digest[7:])).digest()
        self.pcr_value = value

    def reboot(self) -> None:
        self.pcr_value, self.reset_count, self.restart_count = bytes(32), self.reset_count + 1, 0
        self.clock = 10  # the clock of an unorderly shutdown may go back

    def quote(self, nonce: bytes) -> tuple[bytes, bytes]:
        self.clock += 100
        body = attest(
            tpm.parse_public(self.public).name,
            nonce,
            [self.pcr_value],
            (PCR,),
            clock=self.clock,
            reset_count=self.reset_count,
            restart_count=self.restart_count,
        )
        return body, sign(self.key, body)


@dataclass
class World:
    db: Database
    log: TransparencyLog
    verifier: Verifier
    tpm: SoftNode

    def quote(self, events: list[Event]) -> tuple[bool, str, bool]:
        nonce = self.verifier.nonce(NODE)
        body, signature = self.tpm.quote(nonce)
        result = self.verifier.quote(NODE, nonce, body, signature, [e.to_json() for e in events])
        return result.passed, result.reason, result.quarantined

    def gate(self, layer: int = 0) -> tuple[bool, str]:
        decision = self.verifier.gate(NODE, REPO, layer, None)
        return decision.allowed, decision.reason

    def entries(self, kind: str) -> list[dict[str, object]]:
        size, _ = self.log.head()
        found = [json.loads(self.log.entry(i)) for i in range(size)]
        return [entry for entry in found if entry["kind"] == kind]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    db = Database(f"sqlite:///{tmp_path / 'control.db'}")
    migrate.upgrade(db.engine)
    log = TransparencyLog(db, NoteSigner("test", ed25519.Ed25519PrivateKey.generate()), "test", 0.0)
    verifier = Verifier(db, log, AttestationSettings(pcrs=[PCR]))
    node = SoftNode(ec.generate_private_key(ec.SECP256R1()))
    ak = tpm.parse_public(node.public)
    with db.session() as session:
        session.add(
            Attestation(
                node=NODE.name,
                ek_public=b"ek",
                ak_public=node.public,
                ak_name=ak.name,
                bound=True,
                measurements=[],
            )
        )
        session.add(
            Image(
                repository=REPO,
                manifest_digest=MANIFEST,
                layers=[
                    {"index": 0, "digest": digest(b"blob0"), "diff_id": digest(b"diff0")},
                    {"index": 1, "digest": digest(b"blob1"), "diff_id": digest(b"diff1")},
                ],
                publisher="user:admin",
            )
        )
    yield World(db, log, verifier, node)
    log.close()
    db.close()


def measure(world: World, log: list[Event], *events: Event) -> list[Event]:
    world.tpm.extend(list(events))
    return [*log, *events]


def test_a_node_whose_log_grows_in_one_boot_passes(world: World) -> None:
    log = measure(world, [], *GOOD)
    assert world.quote(log)[:2] == (True, "quote verified; 2 measurements match")
    log = measure(world, log, GOOD_1)
    assert world.quote(log)[0]
    assert world.gate(1) == (True, "node attested")


def test_a_mismatch_sticks_across_a_reboot_until_an_administrator_clears_it(
    world: World,
) -> None:
    log = measure(world, [], *GOOD, TAMPERED)
    passed, reason, quarantined = world.quote(log)
    assert not passed
    assert quarantined
    assert f"layer 1 of {REPO} measured diff_id {TAMPERED.digest}" in reason
    assert not world.gate(0)[0]
    assert "quarantined" in world.gate(0)[1]

    world.tpm.reboot()  # a fresh TPM2_Startup(CLEAR): PCR zero, a new log
    log = measure(world, [], *GOOD)
    passed, reason, quarantined = world.quote(log)
    assert (passed, quarantined) == (False, True)
    assert reason.startswith("quote verified; 2 measurements match, but node web-1 is quarantined")
    assert "trustplane node clear web-1" in world.gate(0)[1]

    with pytest.raises(Forbidden, match="administrators only"):
        world.verifier.clear(NODE, NODE.name, "I am the node")
    with pytest.raises(UsageError, match="reason"):
        world.verifier.clear(ADMIN, NODE.name, " ")
    cleared = world.verifier.clear(ADMIN, NODE.name, "reimaged the host, checked the layers")
    assert TAMPERED.digest in cleared.reason
    (entry,) = world.entries("attestation.clear")
    assert entry["subject"] == "node:web-1"
    assert entry["by"] == "user:admin"
    assert entry["reason"] == "reimaged the host, checked the layers"
    assert TAMPERED.digest in str(entry["quarantine"])
    assert not world.gate(0)[0]  # the last quote failed: the node must quote again
    assert world.quote(log)[:2] == (True, "quote verified; 2 measurements match")
    assert world.gate(0) == (True, "node attested")
    with pytest.raises(UsageError, match="not quarantined"):
        world.verifier.clear(ADMIN, NODE.name, "again")
    with pytest.raises(NotFoundError):
        world.verifier.clear(ADMIN, "no-such-node", "typo")


def test_a_clear_in_the_same_boot_covers_the_events_shown_so_far(world: World) -> None:
    log = measure(world, [], *GOOD, TAMPERED)
    assert world.quote(log)[2]
    world.verifier.clear(ADMIN, NODE.name, "the tampered image never ran")
    log = measure(world, log, GOOD_1)
    passed, reason, _ = world.quote(log)
    assert passed, reason
    assert world.gate(0)[0]
    # The reviewed mismatch does not count as a measurement of layer 1; the
    # genuine one measured after it does.
    with world.db.session() as session:
        row = session.get(Attestation, NODE.name)
        assert row is not None
        assert [m["digest"] for m in row.measurements if m["layer"] == 1] == [GOOD_1.digest]
    # What came after the review is checked again.
    log = measure(world, log, TAMPERED)
    assert world.quote(log)[2]


@pytest.mark.parametrize("attack", ["wipe", "shorten", "reorder", "restart"])
def test_a_log_that_does_not_extend_the_accepted_one_is_tampering(
    world: World, attack: str
) -> None:
    log = measure(world, [], *GOOD)
    assert world.quote(log)[0]
    if attack == "wipe":  # STATE_DIR/event-log.json deleted; the PCR reset (PCR 23 only)
        world.tpm.pcr_value, log = bytes(32), []
    elif attack == "shorten":
        world.tpm.pcr_value, log = replay(GOOD[:1])[PCR], GOOD[:1]
    elif attack == "reorder":
        log = GOOD[::-1]
        world.tpm.pcr_value = replay(log)[PCR]
    else:  # a new log from zero that happens to be longer
        log = [GOOD_1, *GOOD]
        world.tpm.pcr_value = replay(log)[PCR]
    passed, reason, quarantined = world.quote(log)
    assert (passed, quarantined) == (False, True)
    assert reason.startswith("tampering: the event log")
    assert not world.gate(0)[0]
    (entry,) = [e for e in world.entries("attestation.quote") if e["result"] == "fail"]
    assert entry["reason"] == reason
    assert entry["quarantined"] is True


def test_a_clock_that_goes_back_within_a_boot_is_tampering(world: World) -> None:
    log = measure(world, [], *GOOD)
    assert world.quote(log)[0]
    world.tpm.clock -= 500
    passed, reason, quarantined = world.quote(log)
    assert (passed, quarantined) == (False, True)
    assert "clock went back" in reason


def test_a_log_that_does_not_explain_the_pcr_sticks(world: World) -> None:
    world.tpm.extend([TAMPERED])  # extended, never logged
    passed, reason, quarantined = world.quote(GOOD[:0])
    assert (passed, quarantined) == (False, True)
    assert "does not replay to the quoted PCR digest" in reason
    world.tpm.reboot()
    assert world.quote([])[2]  # still quarantined after the reboot


def test_transient_failures_do_not_stick(world: World) -> None:
    log = measure(world, [], *GOOD)
    nonce = world.verifier.nonce(NODE)
    body, signature = world.tpm.quote(nonce)
    raw = [e.to_json() for e in log]
    assert world.verifier.quote(NODE, nonce, body, signature, raw).passed
    replayed = world.verifier.quote(NODE, nonce, body, signature, raw)
    assert not replayed.passed
    assert not replayed.quarantined
    assert "already used nonce" in replayed.reason
    forged = world.verifier.nonce(NODE)
    other = SoftNode(ec.generate_private_key(ec.SECP256R1()), world.tpm.pcr_value)
    body, signature = other.quote(forged)
    result = world.verifier.quote(NODE, forged, body, signature, raw)
    assert not result.passed
    assert not result.quarantined
    assert "does not verify" in result.reason
    assert world.quote(log)[0]  # the next genuine quote passes
    assert world.gate(0)[0]


def test_a_replayed_quote_from_before_a_reboot_fails(world: World) -> None:
    log = measure(world, [], *GOOD)
    nonce = world.verifier.nonce(NODE)
    body, signature = world.tpm.quote(nonce)
    raw = [e.to_json() for e in log]
    assert world.verifier.quote(NODE, nonce, body, signature, raw).passed
    world.tpm.reboot()
    assert world.quote([])[0]
    old = world.verifier.quote(NODE, nonce, body, signature, raw)
    assert not old.passed
    assert "already used nonce" in old.reason


def test_a_re_enrolment_of_the_same_ak_keeps_the_record_and_the_quarantine(
    world: World,
) -> None:
    log = measure(world, [], *GOOD, TAMPERED)
    assert world.quote(log)[2]
    with world.db.write_session() as session:
        row = session.get(Attestation, NODE.name)
        assert row is not None
        before = (row.boot_events, row.boot_digest, row.quarantine_reason)
    # The node re-enrols and activates the same AK (done by hand: the
    # credential round trip is tests/integration's).
    with world.db.write_session() as session:
        row = session.get(Attestation, NODE.name)
        assert row is not None
        row.pending_ek_public, row.pending_ak_public = row.ek_public, row.ak_public
        row.pending_ak_name = row.ak_name
        row.challenge_hash = hashlib.sha256(b"s" * 32).digest()
        row.challenge_expires = row.created.replace(year=2999)
    transport = "transport key PEM"  # certified by the AK's signature
    world.verifier.activate(NODE, b"s" * 32, transport, sign(world.tpm.key, transport.encode()))
    with world.db.session() as session:
        row = session.get(Attestation, NODE.name)
        assert row is not None
        assert (row.boot_events, row.boot_digest, row.quarantine_reason) == before
    assert world.quote([])[1].startswith("tampering")  # and the wiped log is still caught


def test_the_settings_refuse_a_resettable_pcr(tmp_path: Path) -> None:
    assert AttestationSettings().pcrs == [13]
    for pcr in (16, 23):
        with pytest.raises(ValueError, match="tpm2_pcrreset"):
            AttestationSettings(pcrs=[pcr])
        assert AttestationSettings(pcrs=[pcr], insecure_resettable_pcrs_for_tests=True).pcrs == [
            pcr
        ]
    with pytest.raises(ValueError, match="0-15"):
        AttestationSettings(pcrs=[18])
    (tmp_path / "server.yaml").write_text("attestation:\n  pcrs: [23]\n")
    with pytest.raises(UsageError, match="tpm2_pcrreset"):
        load_settings(tmp_path)
