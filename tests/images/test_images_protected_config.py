"""--protect-config: a public config without secret history, and per-tier originals."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.crypto import keywrap
from trustplane.crypto.keys import UnwrapKey, load_recipient_key, load_unwrap_key
from trustplane.errors import IntegrityError, MalformedError
from trustplane.images.protected_config import (
    REDACTED_COMMENT,
    VisibleConfig,
    protect,
    public_descriptor,
    reveal,
    visible_layers,
)
from trustplane.images.recipients import Recipient
from trustplane.oci import mediatypes
from trustplane.oci.annotations import PROTECTED_CONFIG
from trustplane.oci.model import Descriptor, ImageConfig

DIFF_IDS = ["sha256:" + c * 64 for c in "0123"]
CONFIG = json.dumps(
    {
        "architecture": "amd64",
        "history": [
            {"created": "t0", "created_by": "ADD base.tar /"},
            {"created": "t1", "created_by": "ENV X=1", "empty_layer": True},
            {"created": "t2", "created_by": "COPY file:aaaa /app/secret.bin"},
            {"created": "t3", "created_by": "RUN build --token=hunter2"},
            {"created": "t4", "created_by": "COPY file:bbbb /top"},
        ],
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": DIFF_IDS},
    },
    separators=(",", ":"),
).encode()


class Holder:
    def __init__(self, tier: int | None) -> None:
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.recipient = Recipient(load_recipient_key(pem, f"tier{tier}"), tier)
        self.key: UnwrapKey = load_unwrap_key(pem, f"tier{tier}")


@pytest.fixture(scope="module")
def holders() -> dict[str, Holder]:
    return {"all": Holder(None), "t2": Holder(2), "t1": Holder(1), "t0": Holder(0)}


def _descriptor(annotation: str | None, **more: str) -> Descriptor:
    annotations = dict(more)
    if annotation is not None:
        annotations[PROTECTED_CONFIG] = annotation
    return Descriptor(
        media_type=mediatypes.OCI_CONFIG,
        digest="sha256:" + "f" * 64,
        size=len(CONFIG),
        annotations=annotations or None,
    )


def test_visible_layers() -> None:
    holder = Holder(1)
    assert visible_layers(holder.recipient, {1, 2}, 4) == 2
    assert visible_layers(holder.recipient, {2, 3}, 4) == 2
    assert visible_layers(holder.recipient, {3}, 4) == 3
    assert visible_layers(holder.recipient, set(), 4) == 4
    assert visible_layers(Holder(None).recipient, {0, 1, 2, 3}, 4) == 4
    assert visible_layers(Holder(0).recipient, {1, 3}, 4) == 1


def test_public_config_hides_the_history_of_encrypted_layers(holders: dict[str, Holder]) -> None:
    config = ImageConfig(CONFIG)
    public, _ = protect(config, {1, 2}, [h.recipient for h in holders.values()])
    doc = json.loads(public)
    assert doc["rootfs"]["diff_ids"] == DIFF_IDS  # Docker checks these on load
    assert doc["history"] == [
        {"created": "t0", "created_by": "ADD base.tar /"},
        {"created": "t1", "created_by": "ENV X=1", "empty_layer": True},
        {"created": "t2", "comment": REDACTED_COMMENT},
        {"created": "t3", "comment": REDACTED_COMMENT},
        {"created": "t4", "created_by": "COPY file:bbbb /top"},
    ]
    assert b"aaaa" not in public
    assert b"hunter2" not in public


def test_each_tier_sees_the_config_of_what_it_can_open(holders: dict[str, Holder]) -> None:
    config = ImageConfig(CONFIG)
    encrypted = {1, 2}
    _, annotation = protect(config, encrypted, [h.recipient for h in holders.values()])
    # One JWE per distinct view: "all" and tier 2 open layers 1 and 2 (4 layers
    # visible), tier 1 opens 1 but not 2 (2 visible), tier 0 neither (1 visible).
    assert len(annotation.split(",")) == 3
    descriptor = _descriptor(annotation)
    full = reveal(descriptor, [holders["all"].key])
    assert full == VisibleConfig(layers=4, config=CONFIG)  # the original bytes
    assert reveal(descriptor, [holders["t2"].key]) == VisibleConfig(4, CONFIG)
    t1 = reveal(descriptor, [holders["t1"].key])
    assert t1 == VisibleConfig(2, config.truncated(2))
    assert t1 is not None
    t1_doc = json.loads(t1.config)
    assert t1_doc["rootfs"]["diff_ids"] == DIFF_IDS[:2]
    assert [h["created_by"] for h in t1_doc["history"]] == [
        "ADD base.tar /",
        "ENV X=1",
        "COPY file:aaaa /app/secret.bin",
    ]
    assert b"hunter2" not in t1.config  # layer 2's history stays hidden from tier 1
    t0 = reveal(descriptor, [holders["t0"].key])
    assert t0 == VisibleConfig(1, config.truncated(1))
    assert t0 is not None
    assert b"aaaa" not in t0.config
    # Several keys: the widest view wins.
    assert reveal(descriptor, [holders["t0"].key, holders["all"].key]) == full


def test_annotation_tokens_are_std_base64_json_jwes(holders: dict[str, Holder]) -> None:
    _, annotation = protect(ImageConfig(CONFIG), {3}, [holders["all"].recipient])
    (token,) = annotation.split(",")
    serialized = base64.b64decode(token, validate=True).decode()
    wrapped = keywrap.recipients_of(serialized)
    assert [w.kid for w in wrapped] == [holders["all"].recipient.key.kid]
    payload = keywrap.unwrap(serialized, [holders["all"].key], "config")
    assert payload is not None
    assert json.loads(payload) == {"layers": 4, "config": base64.b64encode(CONFIG).decode()}


def test_strangers_and_plain_descriptors_reveal_nothing(holders: dict[str, Holder]) -> None:
    _, annotation = protect(ImageConfig(CONFIG), {1}, [holders["t1"].recipient])
    assert reveal(_descriptor(annotation), [Holder(None).key]) is None
    assert reveal(_descriptor(annotation), []) is None
    assert reveal(_descriptor(None), [holders["t1"].key]) is None


def test_tampered_token_for_us_is_an_integrity_error(holders: dict[str, Holder]) -> None:
    _, annotation = protect(ImageConfig(CONFIG), {1}, [holders["all"].recipient])
    document = json.loads(base64.b64decode(annotation))
    text = document["ciphertext"]
    document["ciphertext"] = ("B" if text[0] == "A" else "A") + text[1:]
    tampered = base64.b64encode(json.dumps(document).encode()).decode()
    with pytest.raises(IntegrityError):
        reveal(_descriptor(tampered), [holders["all"].key])


def _wrapped(payload: bytes, holder: Holder) -> str:
    token = keywrap.wrap(payload, [holder.recipient.key])
    return base64.b64encode(token.encode()).decode()


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"layers": 1}',
        b'{"config": "e30="}',
        b'{"layers": "1", "config": "e30="}',
        b'{"layers": -1, "config": "e30="}',
        b'{"layers": 1, "config": "***"}',
    ],
)
def test_malformed_payload(payload: bytes, holders: dict[str, Holder]) -> None:
    with pytest.raises(MalformedError, match="protected config payload is malformed"):
        reveal(_descriptor(_wrapped(payload, holders["all"])), [holders["all"].key])


def test_annotation_that_is_not_base64(holders: dict[str, Holder]) -> None:
    with pytest.raises(MalformedError, match="not base64"):
        reveal(_descriptor("%%%"), [holders["all"].key])
    with pytest.raises(MalformedError, match="not base64"):
        reveal(_descriptor(base64.b64encode(b"\xff\xfe").decode()), [holders["all"].key])


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({PROTECTED_CONFIG: "x"}, None),
        ({PROTECTED_CONFIG: "x", "keep": "me"}, {"keep": "me"}),
        ({"keep": "me"}, {"keep": "me"}),
        (None, None),
    ],
)
def test_public_descriptor_drops_only_our_annotation(
    annotations: dict[str, Any] | None, expected: dict[str, str] | None
) -> None:
    descriptor = Descriptor(
        media_type=mediatypes.OCI_CONFIG,
        digest="sha256:" + "e" * 64,
        size=3,
        annotations=annotations,
    )
    public = public_descriptor(descriptor)
    assert public.annotations == expected
    assert (public.digest, public.size, public.media_type) == (
        descriptor.digest,
        descriptor.size,
        descriptor.media_type,
    )
