"""The MQTT link's nonce record on disk: replays refused across restarts, whatever the clocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trustplane.crypto.command_envelope import MAX_TTL
from trustplane.errors import IntegrityError, UnavailableError
from trustplane.gateway.nonces import NonceStore

A, B, C = "a" * 32, "b" * 32, "c" * 32


def fresh(path: Path, now: float, limit: int = 100) -> NonceStore:
    store = NonceStore(path, limit)
    store.load(now)
    return store


def test_a_nonce_accepted_before_a_restart_is_refused_after_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nonces.json"
    first = fresh(path, now=1000)
    first.claim(A, issued=1000, expires=1060, now=1001)
    assert path.stat().st_mode & 0o777 == 0o600
    # The gateway restarts; the control plane's clock ran ahead of the gateway's, so
    # the command looks issued after this start. The record, not the clock, decides.
    second = fresh(path, now=1002)
    assert second.floor == 1000  # still the first start's: nothing before it is known
    with pytest.raises(IntegrityError, match="replayed"):
        second.claim(A, issued=1000, expires=1060, now=1003)
    # A command issued between the two starts and never seen is accepted.
    second.claim(B, issued=1001.5, expires=1060, now=1003)
    assert B in fresh(path, now=1004)


def test_without_a_record_commands_issued_before_the_start_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    path.write_text("{not json")
    store = fresh(path, now=5000)
    with pytest.raises(IntegrityError, match="before this gateway's nonce record began"):
        store.claim(A, issued=4990, expires=5050, now=5001)
    store.claim(B, issued=5000, expires=5050, now=5001)
    # The floor is kept across restarts until every command before it has expired...
    assert fresh(path, now=5002).floor == 5000
    later = fresh(path, now=5000 + MAX_TTL + 1)
    assert later.floor is None


def test_expired_nonces_are_pruned_and_the_record_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    store = fresh(path, now=0, limit=2)
    store.claim(A, issued=0, expires=10, now=1)
    store.claim(B, issued=0, expires=100, now=2)
    with pytest.raises(IntegrityError, match="too many"):
        store.claim(C, issued=0, expires=100, now=3)
    store.claim(C, issued=0, expires=100, now=11)  # A expired: room again
    assert set(json.loads(path.read_text())["nonces"]) == {B, C}
    assert len(fresh(path, now=50)) == 2
    assert len(fresh(path, now=101)) == 0


def test_an_unwritable_record_refuses_the_command(tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    store = fresh(path, now=0)
    path.mkdir()  # the rename onto it fails (even for root)
    with pytest.raises(UnavailableError, match="cannot be written"):
        store.claim(A, issued=0, expires=100, now=1)
    assert A not in store  # not recorded, so not run
    path.rmdir()
    store.claim(A, issued=0, expires=100, now=2)
    assert A in fresh(path, now=3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
