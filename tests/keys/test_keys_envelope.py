"""Envelope encryption: per-secret data keys, id binding, cheap online rotation."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from trustplane.errors import DecryptionKeyError, IntegrityError, UsageError
from trustplane.keys.envelope import SealedSecret, open_sealed, rewrap, seal
from trustplane.keys.kek import KekProvider
from trustplane.keys.kek_file import FileKekProvider

PAYLOAD = b"db-password: correct horse battery staple"


@pytest.fixture
def kek(tmp_path: Path) -> FileKekProvider:
    return FileKekProvider(tmp_path / "kek.json")


@pytest.mark.parametrize("payload", [b"", b"x", PAYLOAD, bytes(range(256)) * 4096])
def test_round_trip(kek: FileKekProvider, payload: bytes) -> None:
    sealed = seal("secret/1", payload, kek)
    assert sealed.kek_id == kek.current_id()
    if len(payload) >= 8:  # a byte or two turns up in random ciphertext by chance
        assert payload not in sealed.ciphertext
    assert open_sealed("secret/1", sealed, kek) == payload


def test_fields_are_plain_storable_values(kek: FileKekProvider) -> None:
    sealed = seal("s", PAYLOAD, kek)
    assert dataclasses.is_dataclass(sealed)
    for field in dataclasses.fields(sealed):
        assert isinstance(getattr(sealed, field.name), str | bytes)
    assert SealedSecret(**dataclasses.asdict(sealed)) == sealed
    with pytest.raises(dataclasses.FrozenInstanceError):
        sealed.kek_id = "other"  # type: ignore[misc]
    assert PAYLOAD.hex() not in repr(sealed)
    assert sealed.wrapped_key.hex() not in repr(sealed)


def test_each_secret_has_its_own_data_key(kek: FileKekProvider) -> None:
    first, second = seal("s", PAYLOAD, kek), seal("s", PAYLOAD, kek)
    assert first.ciphertext != second.ciphertext
    assert first.wrapped_key != second.wrapped_key


def test_a_secret_moved_to_another_id_fails(kek: FileKekProvider) -> None:
    sealed = seal("tenant-a/db", PAYLOAD, kek)
    with pytest.raises(IntegrityError):
        open_sealed("tenant-b/db", sealed, kek)


def test_swapping_data_keys_between_secrets_fails(kek: FileKekProvider) -> None:
    one, two = seal("one", PAYLOAD, kek), seal("two", b"other", kek)
    mixed = dataclasses.replace(one, wrapped_key=two.wrapped_key)
    with pytest.raises(IntegrityError):
        open_sealed("one", mixed, kek)


def test_tampered_ciphertext_fails_without_leaking(kek: FileKekProvider) -> None:
    sealed = seal("s", PAYLOAD, kek)
    for i in range(len(sealed.ciphertext)):
        body = bytearray(sealed.ciphertext)
        body[i] ^= 0x80
        with pytest.raises(IntegrityError) as info:
            open_sealed("s", dataclasses.replace(sealed, ciphertext=bytes(body)), kek)
        assert "correct horse" not in str(info.value)
    with pytest.raises(IntegrityError, match="malformed"):
        open_sealed("s", dataclasses.replace(sealed, ciphertext=sealed.ciphertext[:20]), kek)


def test_rewrap_keeps_the_payload_ciphertext(kek: FileKekProvider) -> None:
    sealed = seal("s", PAYLOAD, kek)
    new_id = kek.rotate()
    moved = rewrap("s", sealed, kek)
    assert moved.kek_id == new_id != sealed.kek_id
    assert moved.ciphertext == sealed.ciphertext
    assert moved.wrapped_key != sealed.wrapped_key
    assert open_sealed("s", moved, kek) == PAYLOAD
    assert rewrap("s", moved, kek) is moved  # already current: nothing to do


def test_retired_kek_fails_closed_and_rewrapped_secrets_survive(kek: FileKekProvider) -> None:
    secrets = {f"s{i}": seal(f"s{i}", f"payload {i}".encode(), kek) for i in range(5)}
    old = kek.current_id()
    kek.rotate()
    rewrapped = {sid: rewrap(sid, sealed, kek) for sid, sealed in secrets.items() if sid != "s4"}
    kek.retire(old)
    for sid, sealed in rewrapped.items():
        assert open_sealed(sid, sealed, kek) == f"payload {sid[1:]}".encode()
    with pytest.raises(DecryptionKeyError):
        open_sealed("s4", secrets["s4"], kek)  # missed by the rotation: fails closed
    with pytest.raises(DecryptionKeyError):
        rewrap("s4", secrets["s4"], kek)


def test_rewrap_cannot_move_a_secret_to_another_id(kek: FileKekProvider) -> None:
    sealed = seal("a", PAYLOAD, kek)
    kek.rotate()
    with pytest.raises(IntegrityError):
        rewrap("b", sealed, kek)


def test_payload_never_in_logs_or_errors(
    kek: FileKekProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sealed = seal("s", PAYLOAD, kek)
    messages = []
    for attempt in (
        lambda: open_sealed("t", sealed, kek),
        lambda: open_sealed("s", dataclasses.replace(sealed, ciphertext=b"\x01" * 40), kek),
        lambda: open_sealed("s", dataclasses.replace(sealed, kek_id="file:0042-00"), kek),
    ):
        with pytest.raises(Exception) as info:  # noqa: PT011 - any failure, we check its text
            attempt()
        messages.append(str(info.value))
        messages.append(repr(info.value))
    text = "\n".join(messages + [r.getMessage() for r in caplog.records])
    for needle in (PAYLOAD.decode(), PAYLOAD.hex(), "correct horse"):
        assert needle not in text


@pytest.mark.parametrize("bad_id", ["", "x" * 1025, "\ud800"])
def test_secret_ids_are_checked(kek: KekProvider, bad_id: str) -> None:
    with pytest.raises(UsageError):
        seal(bad_id, PAYLOAD, kek)
