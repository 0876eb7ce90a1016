"""--recipient jwe:KEY.pem[:tier=N]."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.crypto.keys import load_recipient_key
from trustplane.errors import MalformedError, NotFoundError, UsageError
from trustplane.images.recipients import Recipient, for_layer, parse_recipient


def _public_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "pub.pem"
    path.write_bytes(_public_pem())
    return path


def test_recipient_without_tier_reaches_every_layer(pem: Path) -> None:
    recipient = parse_recipient(f"jwe:{pem}")
    assert recipient.tier is None
    assert recipient.key == load_recipient_key(pem.read_bytes(), str(pem))
    assert recipient.key.source == str(pem)
    assert all(recipient.reaches(layer) for layer in (0, 1, 50, 10_000))


def test_recipient_with_tier_reaches_up_to_it(pem: Path) -> None:
    recipient = parse_recipient(f"jwe:{pem}:tier=2")
    assert recipient.tier == 2
    assert [recipient.reaches(layer) for layer in range(5)] == [True, True, True, False, False]
    assert parse_recipient(f"jwe:{pem}:tier=0").reaches(0)
    assert not parse_recipient(f"jwe:{pem}:tier=0").reaches(1)


def test_path_with_colons(tmp_path: Path) -> None:
    odd = tmp_path / "a:b"
    odd.mkdir()
    path = odd / "k.pem"
    path.write_bytes(_public_pem())
    assert parse_recipient(f"jwe:{path}").key.source == str(path)
    assert parse_recipient(f"jwe:{path}:tier=1").tier == 1


def test_for_layer_picks_the_recipients_whose_tier_reaches(tmp_path: Path) -> None:
    keys = []
    for name in ("a", "b", "c"):
        path = tmp_path / f"{name}.pem"
        path.write_bytes(_public_pem())
        keys.append(path)
    everyone = parse_recipient(f"jwe:{keys[0]}")
    tier0 = parse_recipient(f"jwe:{keys[1]}:tier=0")
    tier1 = parse_recipient(f"jwe:{keys[2]}:tier=1")
    recipients = [everyone, tier0, tier1]
    assert for_layer(recipients, 0) == [everyone.key, tier0.key, tier1.key]
    assert for_layer(recipients, 1) == [everyone.key, tier1.key]
    assert for_layer(recipients, 2) == [everyone.key]
    assert for_layer([], 0) == []


@pytest.mark.parametrize(
    "spec",
    ["pub.pem", "pgp:key.asc", "jwe:", "JWE:key.pem", ":key.pem"],
)
def test_bad_specs_are_usage_errors(spec: str) -> None:
    with pytest.raises(UsageError, match=r"expected jwe:PUBKEY\.pem"):
        parse_recipient(spec)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        parse_recipient(f"jwe:{tmp_path / 'nope.pem'}")
    with pytest.raises(NotFoundError, match="does not exist"):
        parse_recipient(f"jwe:{tmp_path / 'nope.pem'}:tier=1")


def test_unreadable_path_and_bad_tier(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory"):
        parse_recipient(f"jwe:{tmp_path}")
    with pytest.raises(NotFoundError, match="does not exist"):
        parse_recipient(f"jwe:{tmp_path / 'k.pem'}:tier=1")
    # A malformed option is a usage error, not a file that does not exist.
    with pytest.raises(UsageError, match="give a layer index"):
        parse_recipient(f"jwe:{tmp_path / 'k.pem'}:tier=x")
    with pytest.raises(UsageError, match="give a layer index"):
        parse_recipient(f"jwe:{tmp_path / 'k.pem'}:tier=-1")
    with pytest.raises(UsageError, match="unknown option 'tear'"):
        parse_recipient(f"jwe:{tmp_path / 'k.pem'}:tear=1")


def test_a_file_whose_name_looks_like_an_option_is_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k.pem:tier=x"
    path.write_bytes(_public_pem())
    assert parse_recipient(f"jwe:{path}").tier is None


def test_not_a_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_text("hello")
    with pytest.raises(MalformedError, match=r"k\.pem"):
        parse_recipient(f"jwe:{path}")


def test_recipient_is_a_plain_value(pem: Path) -> None:
    key = parse_recipient(f"jwe:{pem}").key
    assert Recipient(key, 3) == Recipient(key, 3)
    assert Recipient(key, 3) != Recipient(key, None)
