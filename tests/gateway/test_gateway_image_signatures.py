"""Which logged signatures the gateway accepts: only a trusted key's, over this digest and name.

The integration tests cover what the control plane lets a publisher record;
these cover what it would never store (forged bytes, a payload for another
digest, entries from before payloads were kept), as a tampered database or
an old log would hand them over.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from trustplane.api.signatures import SignatureEntry
from trustplane.crypto.signing import SigningKey, generate_signing_key
from trustplane.errors import UsageError
from trustplane.gateway.image_signatures import load_policy, verify_entry
from trustplane.images.sign import simple_signing_payload

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def record(**fields: Any) -> SignatureEntry:
    """A signature entry as `GET /v1/signatures` lists it."""
    defaults: dict[str, Any] = {
        "repository": "registry.example/acme/app",
        "manifest_digest": DIGEST,
        "key_id": "k",
        "payload": None,
        "signature": None,
        "subject": "user:publisher",
        "log_index": 7,
    }
    return SignatureEntry(**{**defaults, **fields})


def entry(key: SigningKey, digest: str = DIGEST, name: str = "acme/app") -> SignatureEntry:
    payload = simple_signing_payload(f"registry.example/{name}", digest)
    return record(
        payload=base64.b64encode(payload).decode(),
        signature=base64.b64encode(key.sign(payload)).decode(),
    )


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_signing_key("ecdsa-p256", "trusted")


def test_a_trusted_signature_over_this_digest_and_name_is_accepted(key: SigningKey) -> None:
    assert verify_entry(entry(key), (key.public,), DIGEST, "registry.example/acme/app") is None


def test_forged_moved_and_untrusted_signatures_are_refused(key: SigningKey) -> None:
    keys = (key.public,)
    genuine = entry(key)
    raw = bytearray(base64.b64decode(str(genuine.signature)))
    raw[-1] ^= 1
    forged = genuine.model_copy(update={"signature": base64.b64encode(bytes(raw)).decode()})
    reason = verify_entry(forged, keys, DIGEST, "registry.example/acme/app")
    assert reason is not None
    assert "does not verify" in reason
    other_payload = simple_signing_payload("registry.example/acme/app", OTHER)
    tampered = genuine.model_copy(update={"payload": base64.b64encode(other_payload).decode()})
    assert "does not verify" in str(verify_entry(tampered, keys, DIGEST, "x"))
    other_digest = verify_entry(entry(key, OTHER), keys, DIGEST, "registry.example/acme/app")
    assert other_digest is not None
    assert f"is for another image ({OTHER})" in other_digest
    other_name = verify_entry(entry(key), keys, DIGEST, "registry.example/acme/else")
    assert "names registry.example/acme/app, not registry.example/acme/else" in str(other_name)
    untrusted = generate_signing_key("ed25519", "other")
    assert "does not verify" in str(verify_entry(entry(untrusted), keys, DIGEST, "x"))
    assert "trusts no signing key" in str(verify_entry(entry(key), (), DIGEST, "x"))


@pytest.mark.parametrize(
    "broken",
    [
        {"log_index": 1},  # logged before payloads were kept
        {"payload": None, "signature": None},
        {"payload": "not base64!", "signature": "AAAA"},
        {"payload": "", "signature": ""},
    ],
)
def test_entries_without_a_verifiable_payload_are_refused(
    key: SigningKey, broken: dict[str, Any]
) -> None:
    reason = verify_entry(record(**broken), (key.public,), DIGEST, "registry.example/acme/app")
    assert reason is not None
    assert "has no payload and signature to verify" in reason


def test_the_policy_loads_public_keys_and_refuses_anything_else(
    key: SigningKey, tmp_path: Path
) -> None:
    good = tmp_path / "good.pub"
    good.write_bytes(key.public.public_pem())
    policy = load_policy([good], required=True)
    assert [k.key_id for k in policy.keys] == [key.public.key_id]
    assert policy.required
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    with pytest.raises(UsageError, match="not a PEM public key"):
        load_policy([good, junk], required=False)
    with pytest.raises(UsageError, match="No such file"):
        load_policy([tmp_path / "absent.pub"], required=False)
    with pytest.raises(UsageError, match="needs at least one --signature-key"):
        load_policy([], required=True)
