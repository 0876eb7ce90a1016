"""The layer-key broker's rules: the registration decides the layer, the policy the tier,
the attestation gate the node; every answer is logged before it is given."""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass

import pytest
from plane_helpers import entries_since, set_policy

from trustplane.api.images import ImageRecord, PublishedLayer
from trustplane.control.identity import Principal
from trustplane.control.policy import Decision
from trustplane.control.service import ControlPlane
from trustplane.crypto import keywrap
from trustplane.crypto.keys import generate_key_pair, load_recipient_key, load_unwrap_key
from trustplane.crypto.layer_cipher import PrivateOptions
from trustplane.errors import DecryptionKeyError, Forbidden

ADMIN = Principal("user", "admin", "admin", frozenset())
EDGE = Principal("node", "edge-1", "node", frozenset())
ATTESTED = Principal("node", "secure-1", "node", frozenset())
STRANGER = Principal("node", "stranger", "node", frozenset())
POLICY = """\
version: 1
rules:
  - roles: [admin]
    actions: ["*"]
    resources: ["*"]
  - subjects: ["node:edge-*"]
    actions: [key.release]
    resources: ["image:shop/app"]
    max_layer: 1
  - subjects: ["node:secure-*"]
    actions: [key.release]
    resources: ["image:shop/app"]
    require_attestation: true
"""


@dataclass
class Published:
    options: list[PrivateOptions]
    annotations: list[str]


@pytest.fixture
def published(plane: ControlPlane) -> Published:
    """shop/app: three layers encrypted for a KMS recipient, registered by the admin."""
    set_policy(plane, POLICY)
    recipient = plane.broker.create_recipient(ADMIN, "shop", "ec-p256")
    to_kms = load_recipient_key(recipient.public_key.encode(), "kms:shop")
    options = [
        PrivateOptions(
            symkey=os.urandom(32),
            nonce=os.urandom(16),
            digest="sha256:" + os.urandom(32).hex(),
        )
        for _ in range(3)
    ]
    annotations = [
        base64.b64encode(keywrap.wrap(o.to_json(), [to_kms]).encode()).decode() for o in options
    ]
    plane.images.register(
        ADMIN,
        ImageRecord(
            repository="shop/app",
            manifest_digest="sha256:" + os.urandom(32).hex(),
            layers=[
                PublishedLayer(index=i, digest=o.digest, encrypted=True)
                for i, o in enumerate(options)
            ],
        ),
    )
    return Published(options, annotations)


class Transport:
    def __init__(self) -> None:
        private, public = generate_key_pair("ec-p256")
        self.public = public.decode()
        self.key = load_unwrap_key(private, "transport")

    def open(self, jwe: str) -> PrivateOptions:
        payload = keywrap.unwrap(jwe, [self.key], "answer")
        assert payload is not None
        return PrivateOptions.from_json(payload)


def test_a_granted_layer_comes_re_wrapped_to_the_callers_transport_key(
    plane: ControlPlane, published: Published
) -> None:
    transport = Transport()
    start, _ = plane.log.head()
    answer = plane.broker.unwrap(EDGE, published.annotations[1], transport.public)
    assert (answer.repository, answer.layer) == ("shop/app", 1)  # the registration's word
    assert transport.open(answer.jwe) == published.options[1]
    stranger = load_unwrap_key(generate_key_pair("ec-p256")[0], "someone else")
    assert keywrap.unwrap(answer.jwe, [stranger], "answer") is None
    (entry,) = entries_since(plane, start)
    assert (entry["kind"], entry["subject"], entry["image"], entry["layer"], entry["decision"]) == (
        "kms.unwrap",
        "node:edge-1",
        "shop/app",
        1,
        "allow",
    )


def test_a_layer_above_the_callers_tier_is_refused_and_logged(
    plane: ControlPlane, published: Published
) -> None:
    start, _ = plane.log.head()
    with pytest.raises(Forbidden, match="policy refuses layer 2 of shop/app"):
        plane.broker.unwrap(EDGE, published.annotations[2], Transport().public)
    with pytest.raises(Forbidden, match="policy refuses layer 0 of shop/app"):
        plane.broker.unwrap(STRANGER, published.annotations[0], Transport().public)
    decisions = [(e["subject"], e["layer"], e["decision"]) for e in entries_since(plane, start)]
    assert decisions == [("node:edge-1", 2, "deny"), ("node:stranger", 0, "deny")]


def test_a_rule_that_requires_attestation_asks_the_gate_and_fails_closed(
    plane: ControlPlane, published: Published
) -> None:
    annotation, transport = published.annotations[0], Transport()
    # The real verifier: this node never enrolled a TPM.
    with pytest.raises(Forbidden, match="attestation required"):
        plane.broker.unwrap(ATTESTED, annotation, transport.public)
    gate = plane.broker.gate
    verifier = gate.check
    try:
        gate.check = None  # no verifier at all: deny, never allow
        with pytest.raises(Forbidden, match="no attestation verifier is configured"):
            plane.broker.unwrap(ATTESTED, annotation, transport.public)
        asked: list[tuple[str, str | None, int | None, str | None]] = []

        def fresh_quote(
            who: Principal, repository: str | None, layer: int | None, key: str | None
        ) -> Decision:
            asked.append((who.subject, repository, layer, key))
            return Decision(True, "attested 3 s ago")

        gate.check = fresh_quote
        answer = plane.broker.unwrap(ATTESTED, annotation, transport.public)
    finally:
        gate.check = verifier
    assert transport.open(answer.jwe) == published.options[0]
    # The gate is told which layer, and which transport key the keys go to.
    assert asked == [("node:secure-1", "shop/app", 0, transport.public)]


def test_a_layer_of_no_registered_image_gets_nothing(
    plane: ControlPlane, published: Published
) -> None:
    recipient = load_recipient_key(plane.broker.recipient("shop").public_key.encode(), "kms")
    stray = PrivateOptions(symkey=os.urandom(32), nonce=os.urandom(16), digest="sha256:" + "0" * 64)
    annotation = base64.b64encode(keywrap.wrap(stray.to_json(), [recipient]).encode()).decode()
    with pytest.raises(Forbidden, match="belongs to no registered image"):
        plane.broker.unwrap(ADMIN, annotation, Transport().public)


def test_a_layer_for_no_kms_key_is_a_key_error(plane: ControlPlane, published: Published) -> None:
    _, public = generate_key_pair("ec-p256")
    elsewhere = load_recipient_key(public, "someone's own key")
    options = PrivateOptions(
        symkey=os.urandom(32), nonce=os.urandom(16), digest="sha256:" + "1" * 64
    )
    annotation = base64.b64encode(keywrap.wrap(options.to_json(), [elsewhere]).encode()).decode()
    with pytest.raises(DecryptionKeyError, match="no recipient key held by the KMS"):
        plane.broker.unwrap(ADMIN, annotation, Transport().public)


def test_the_event_loop_path_gives_the_same_answers(
    plane: ControlPlane, published: Published
) -> None:
    """unwrap_async answers from memory when it can, from a worker thread when it cannot."""
    transport = Transport()

    async def both() -> list[PrivateOptions]:
        first = await plane.broker.unwrap_async(EDGE, published.annotations[0], transport.public)
        again = await plane.broker.unwrap_async(EDGE, published.annotations[1], transport.public)
        return [transport.open(first.jwe), transport.open(again.jwe)]

    assert asyncio.run(both()) == published.options[:2]
    with pytest.raises(Forbidden):
        asyncio.run(plane.broker.unwrap_async(EDGE, published.annotations[2], transport.public))
