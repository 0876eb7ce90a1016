"""Keys only for attested nodes: a real swtpm, a real control plane.

The control plane's policy lets nodes `node:att-*` have image layer keys
only with `require_attestation: true`. Each node enrols its TPM (EK, AK,
MakeCredential on the server, ActivateCredential in swtpm), measures the
image's layers into PCR 13 (which nobody resets without a reboot) with an
event log, and is quoted against a fresh nonce. Only a node whose last quote
passed, recently, with the reference measurements, and that is not
quarantined gets a layer key; every verdict is in the transparency log.
Each test has its own swtpm (a node's measurements stay in its PCR).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import start_control_plane_or_fail
from control_helpers import Cli, add_policy_rule, entries_since, log_size
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk

from trustplane.agent.attester import Attester, Layer
from trustplane.agent.tpm import Tpm
from trustplane.api.attestation import Enrollment
from trustplane.api.images import LayerRecord
from trustplane.client import ControlClient
from trustplane.crypto import keywrap
from trustplane.crypto.keys import generate_key_pair, load_recipient_key, load_unwrap_key
from trustplane.crypto.layer_cipher import PrivateOptions
from trustplane.crypto.node_assertion import make_node_assertion
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.swtpm import RunningSwtpm
from trustplane.errors import Forbidden, IntegrityError, TrustplaneError, UsageError
from trustplane.trust.attestation import Event, replay

MAX_AGE = 4
REPOSITORY = "registry.test/attested/app"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trust"))
from tpm_helpers import rsa_ek_public  # noqa: E402

RULE = """\
  - subjects: ["node:att-*"]
    actions: [key.release]
    resources: ["image:*", "secret:*"]
    require_attestation: true
"""


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    manifest: str
    layers: list[Layer]
    annotations: list[str]
    """Per layer: the ocicrypt key annotation (to the KMS's recipient)."""
    options: list[PrivateOptions]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    server = start_control_plane_or_fail(
        tmp_path_factory.mktemp("attestation"),
        env={"TRUSTPLANE_ATTESTATION__MAX_AGE_SECONDS": str(MAX_AGE)},
    )
    add_policy_rule(server, RULE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(plane: RunningControlPlane) -> Iterator[ControlClient]:
    client = plane.admin()
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(admin: ControlClient) -> Image:
    """Two encrypted layers, registered with their reference digests."""
    recipient = admin.create_recipient("attested-images")
    key = load_recipient_key(recipient.public_key.encode(), "recipient")
    layers, annotations, options = [], [], []
    for index in range(2):
        plain = os.urandom(64)
        layer = Layer(index, digest(b"gz" + plain), digest(plain))
        option = PrivateOptions(symkey=os.urandom(32), nonce=os.urandom(16), digest=layer.blob)
        jwe = keywrap.wrap(option.to_json(), [key])
        layers.append(layer)
        options.append(option)
        annotations.append(base64.b64encode(jwe.encode()).decode())
    manifest = digest(os.urandom(32))
    admin.register_image(
        REPOSITORY,
        manifest,
        [
            LayerRecord(index=x.index, digest=x.blob, encrypted=True, diff_id=x.diff_id)
            for x in layers
        ],
    )
    return Image(manifest, layers, annotations, options)


@dataclass
class Node:
    name: str
    client: ControlClient
    attester: Attester
    transport_public: str
    transport_private: bytes

    def unwrap(self, image: Image, layer: int) -> PrivateOptions:
        answer = self.client.unwrap(image.annotations[layer], self.transport_public)
        key = load_unwrap_key(self.transport_private, "transport")
        payload = keywrap.unwrap(answer.jwe, [key], "test")
        assert payload is not None
        return PrivateOptions.from_json(payload)


@pytest.fixture
def node(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    tmp_path: Path,
) -> Iterator[Node]:
    """A fresh node (its own name, key pair, state dir) on the session's swtpm."""
    name = f"att-{os.urandom(3).hex()}"
    signing = ec.generate_private_key(ec.SECP256R1())
    pem = jwk.JWK.from_pyca(signing).export_to_pem().decode()
    admin.register_node(name, "host", pem)
    client = plane.client()
    client.login_node(
        name, make_node_assertion(jwk.JWK.from_pyca(signing), name, plane.url + "/v1/auth/token")
    )
    private, public = generate_key_pair("ec-p256")
    with Tpm(swtpm.tcti) as tpm:
        yield Node(name, client, Attester(tpm, tmp_path / "agent"), public.decode(), private)
    client.close()


def attestation_entries(admin: ControlClient, start: int, name: str) -> list[tuple[str, str]]:
    return [
        (e["kind"], e["result"])
        for e in entries_since(admin, start)
        if e["kind"].startswith("attestation.") and e["subject"] == f"node:{name}"
    ]


def unwrap_denials(admin: ControlClient, start: int, name: str) -> list[str]:
    return [
        e["reason"]
        for e in entries_since(admin, start)
        if e["kind"] == "kms.unwrap" and e["subject"] == f"node:{name}" and e["decision"] == "deny"
    ]


def test_attested_node_gets_the_layer_keys(
    node: Node, image: Image, admin: ControlClient, plane: RunningControlPlane
) -> None:
    start = log_size(plane)
    node.attester.enroll(node.client, node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers)
    verdict = node.attester.attest(node.client)
    assert verdict.passed, verdict.reason
    assert node.unwrap(image, 1) == image.options[1]
    assert node.unwrap(image, 0) == image.options[0]
    assert attestation_entries(admin, start, node.name) == [
        ("attestation.enroll", "pass"),
        ("attestation.activate", "pass"),
        ("attestation.quote", "pass"),
    ]
    allowed = [
        e
        for e in entries_since(admin, start)
        if e["kind"] == "kms.unwrap" and e["subject"] == f"node:{node.name}"
    ]
    assert [e["decision"] for e in allowed] == ["allow", "allow"]
    assert all("node attested" in e["reason"] for e in allowed)


def test_a_stale_attestation_gets_nothing(
    node: Node, image: Image, plane: RunningControlPlane, admin: ControlClient
) -> None:
    node.attester.enroll(node.client, node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers)
    assert node.attester.attest(node.client).passed
    assert node.unwrap(image, 1) == image.options[1]
    time.sleep(MAX_AGE + 0.5)
    start = log_size(plane)
    with pytest.raises(Forbidden, match="stale"):
        node.unwrap(image, 1)
    assert node.attester.attest(node.client).passed  # re-attested: fresh again
    assert node.unwrap(image, 1) == image.options[1]
    assert any("stale" in reason for reason in unwrap_denials(admin, start, node.name))


def test_a_silent_node_loses_its_attested_state(
    node: Node, image: Image, plane: RunningControlPlane, admin: ControlClient
) -> None:
    """The verifier's sweep, not the next key request, takes the state away."""
    node.attester.enroll(node.client, node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers)
    verdict = node.attester.attest(node.client)
    assert verdict.passed
    assert verdict.interval == 60.0  # the verifier's pace, read with the nonce
    start = log_size(plane)
    deadline = time.monotonic() + MAX_AGE + 5
    while time.monotonic() < deadline:
        if ("attestation.expire", "fail") in attestation_entries(admin, start, node.name):
            break
        time.sleep(0.25)
    assert attestation_entries(admin, start, node.name) == [("attestation.expire", "fail")]
    with pytest.raises(Forbidden, match="stale"):
        node.unwrap(image, 1)
    assert node.attester.attest(node.client).passed  # answering again restores it
    assert node.unwrap(image, 1) == image.options[1]


def test_a_tampered_layer_gets_nothing(
    node: Node, image: Image, admin: ControlClient, plane: RunningControlPlane
) -> None:
    node.attester.enroll(node.client, node.transport_public)
    good, bad = image.layers
    tampered = Layer(bad.index, bad.blob, digest(b"tampered"))
    node.attester.measure(REPOSITORY, image.manifest, [good, tampered])
    start = log_size(plane)
    verdict = node.attester.attest(node.client)
    assert not verdict.passed
    assert f"layer 1 of {REPOSITORY} measured diff_id {tampered.diff_id}" in verdict.reason
    assert verdict.quarantined
    for layer in (0, 1):
        with pytest.raises(Forbidden, match="quarantined"):
            node.unwrap(image, layer)
    assert attestation_entries(admin, start, node.name) == [("attestation.quote", "fail")]
    assert len(unwrap_denials(admin, start, node.name)) == 2


def test_a_lying_event_log_gets_nothing(
    node: Node, image: Image, admin: ControlClient, plane: RunningControlPlane
) -> None:
    """The PCR holds a tampered digest while the log claims the reference one."""
    node.attester.enroll(node.client, node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers[:1])
    node.attester.tpm.extend(node.attester.pcr, hashlib.sha256(b"unlogged").digest())
    verdict = node.attester.attest(node.client)
    assert not verdict.passed
    assert verdict.quarantined
    assert "does not replay to the quoted PCR digest" in verdict.reason
    with pytest.raises(Forbidden, match="quarantined"):
        node.unwrap(image, 0)


def test_a_replayed_quote_gets_nothing(
    node: Node, image: Image, admin: ControlClient, plane: RunningControlPlane
) -> None:
    node.attester.enroll(node.client, node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers)
    nonce = bytes.fromhex(node.client.nonce().nonce)
    old = node.attester.quote(nonce)
    first = node.client.quote(old)
    assert first.passed, first.reason
    assert node.unwrap(image, 1) == image.options[1]

    start = log_size(plane)
    again = node.client.quote(old)
    assert not again.passed
    assert "already used nonce" in again.reason
    with pytest.raises(Forbidden, match="last attestation failed"):
        node.unwrap(image, 1)
    # The old quote under a fresh nonce: the TPM signed the old one.
    fresh = node.client.nonce().nonce
    moved = node.client.quote(old.model_copy(update={"nonce": fresh}))
    assert not moved.passed
    assert "does not carry the nonce" in moved.reason
    with pytest.raises(Forbidden):
        node.unwrap(image, 1)
    assert attestation_entries(admin, start, node.name) == [
        ("attestation.quote", "fail"),
        ("attestation.quote", "fail"),
    ]


def test_an_unbound_ak_gets_nothing(
    node: Node, image: Image, admin: ControlClient, plane: RunningControlPlane
) -> None:
    ident = node.attester.identity()
    node.client.enroll(
        Enrollment(
            ek_public=base64.b64encode(ident.ek_public).decode(),
            ak_public=base64.b64encode(ident.ak_public).decode(),
            ak_name=base64.b64encode(ident.ak_name).decode(),
        )
    )
    # No ActivateCredential: the node guesses the secret.
    start = log_size(plane)
    with pytest.raises(Forbidden, match="not bound"):
        node.attester.activate(node.client, os.urandom(32), node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers)
    verdict = node.attester.attest(node.client)
    assert not verdict.passed
    assert "not bound to its EK" in verdict.reason
    with pytest.raises(Forbidden, match="not bound"):
        node.unwrap(image, 0)
    assert attestation_entries(admin, start, node.name) == [
        ("attestation.activate", "fail"),
        ("attestation.quote", "fail"),
    ]


def test_a_transport_key_the_tpm_did_not_certify_gets_nothing(node: Node, image: Image) -> None:
    node.attester.enroll(node.client, node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers)
    assert node.attester.attest(node.client).passed
    _, stolen = generate_key_pair("ec-p256")
    with pytest.raises(Forbidden, match="transport key not certified"):
        node.client.unwrap(image.annotations[0], stolen.decode())
    assert node.unwrap(image, 0) == image.options[0]


def test_an_ak_with_the_wrong_name_is_refused(node: Node) -> None:
    ident = node.attester.identity()
    with pytest.raises(TrustplaneError, match="AK name does not match"):
        node.client.enroll(
            Enrollment(
                ek_public=base64.b64encode(ident.ek_public).decode(),
                ak_public=base64.b64encode(ident.ak_public).decode(),
                ak_name=base64.b64encode(
                    ident.ak_name[:-1] + bytes([ident.ak_name[-1] ^ 1])
                ).decode(),
            )
        )


def test_the_agent_command_enrols_and_attests(
    plane: RunningControlPlane, admin: ControlClient, swtpm: RunningSwtpm, tmp_path: Path
) -> None:
    name = f"att-cli-{os.urandom(3).hex()}"
    signing = ec.generate_private_key(ec.SECP256R1())
    key = tmp_path / "node.key"
    key.write_bytes(jwk.JWK.from_pyca(signing).export_to_pem(private_key=True, password=None))
    admin.register_node(name, "host", jwk.JWK.from_pyca(signing).export_to_pem().decode())
    start = log_size(plane)
    cli = Cli(tmp_path / "session.json")
    args = ("agent", "--server", plane.url, "--tpm", swtpm.tcti, "--node", name)
    args += ("--node-key", str(key), "--state-dir", str(tmp_path / "state"))
    args += ("--ca", str(plane.ca_file), "--once")
    first = cli(*args, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"{name}: attested: quote verified" in first.stdout
    assert (tmp_path / "state" / "enrolment.json").exists()
    second = cli(*args, timeout=120)  # enrolled already: only a quote
    assert second.returncode == 0, second.stderr
    assert attestation_entries(admin, start, name) == [
        ("attestation.enroll", "pass"),
        ("attestation.activate", "pass"),
        ("attestation.quote", "pass"),
        ("attestation.quote", "pass"),
    ]
    wrong = cli(*args[:4], "swtpm:host=127.0.0.1,port=1", *args[5:], timeout=120)
    assert wrong.returncode != 0
    assert "cannot open the TPM" in wrong.stderr


def test_a_secret_is_released_to_a_node_only_once_attested(
    node: Node, admin: ControlClient, image: Image
) -> None:
    payload = os.urandom(32)
    secret = admin.create_secret(payload, readers=[f"node:{node.name}"]).id
    with pytest.raises(Forbidden, match="not bound"):
        node.client.secret_payload(secret)
    node.attester.enroll(node.client, node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers)
    assert node.attester.attest(node.client).passed
    assert node.client.secret_payload(secret) == payload


def test_the_attester_never_resets_the_pcr_nor_drops_its_log(
    swtpm: RunningSwtpm, tmp_path: Path, image: Image
) -> None:
    state = tmp_path / "agent"
    with Tpm(swtpm.tcti) as device:
        attester = Attester(device, state)
        assert attester.pcr == 13
        attester.measure(REPOSITORY, image.manifest, image.layers)
        assert len(attester.log.events) == 4
        assert Attester(device, state).log.events == attester.log.events  # same boot: kept
        # A crash between logging an event and extending it: the next start
        # finishes the extension (the log is written first).
        extra = Event(13, digest(b"crash"), REPOSITORY, image.manifest, 1, "blob")
        attester.log.append(extra)
        resumed = Attester(device, state)
        assert resumed.log.events[-1] == extra
        assert replay(resumed.log.events)[13] == device.read(13)
        # Another writer: nothing is reset, nothing dropped; the verifier will see both.
        device.extend(13, hashlib.sha256(b"someone else").digest())
        kept = Attester(device, state)
        assert kept.log.events == resumed.log.events
        assert device.read(13) not in (bytes(32), replay(kept.log.events)[13])
        with pytest.raises(UsageError, match="tpm2_pcrreset 23"):
            Attester(device, state, 23)
        assert Attester(device, tmp_path / "test", 23, allow_resettable_pcr=True).pcr == 23
    rebooted = swtpm.power_cycle()
    with rebooted, Tpm(rebooted.tcti) as device:
        fresh = Attester(device, state)  # a new boot: a new log; the old one is kept
        assert fresh.log.events == []
        (old,) = state.glob("event-log.boot-*.json")
        assert len(json.loads(old.read_text())["events"]) == 5


def test_an_old_quote_replayed_after_a_reboot_fails(
    node: Node, image: Image, admin: ControlClient, plane: RunningControlPlane, swtpm: RunningSwtpm
) -> None:
    node.attester.enroll(node.client, node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers)
    nonce = bytes.fromhex(node.client.nonce().nonce)
    old = node.attester.quote(nonce)
    assert node.client.quote(old).passed
    node.attester.tpm.close()
    rebooted = swtpm.power_cycle()
    with rebooted, Tpm(rebooted.tcti) as device:
        attester = Attester(device, node.attester.state_dir)
        attester.measure(REPOSITORY, image.manifest, image.layers[:1])
        assert attester.attest(node.client).passed  # the new boot's log, from zero
        start = log_size(plane)
        again = node.client.quote(old)
        assert not again.passed
        assert "already used nonce" in again.reason
        fresh = node.client.nonce().nonce
        moved = node.client.quote(old.model_copy(update={"nonce": fresh}))
        assert not moved.passed
        assert "does not carry the nonce" in moved.reason
        assert not again.quarantined
        assert not moved.quarantined  # a replay tells nothing about the node
        assert attestation_entries(admin, start, node.name) == [
            ("attestation.quote", "fail"),
            ("attestation.quote", "fail"),
        ]
        assert attester.attest(node.client).passed
        assert node.unwrap(image, 0) == image.options[0]


def test_a_bound_node_cannot_move_to_another_tpm(node: Node, tmp_path: Path) -> None:
    node.attester.enroll(node.client, node.transport_public)
    ident = node.attester.identity()
    private = rsa.generate_private_key(65537, 2048)
    other_ek = rsa_ek_public(private.public_key())
    with pytest.raises(IntegrityError, match="bound to another TPM"):
        node.client.enroll(
            Enrollment(
                ek_public=base64.b64encode(other_ek).decode(),
                ak_public=base64.b64encode(ident.ak_public).decode(),
                ak_name=base64.b64encode(ident.ak_name).decode(),
            )
        )
    node.attester.enroll(node.client, node.transport_public)  # the same TPM may re-enrol


def test_a_re_enrolment_that_is_never_activated_takes_nothing_away(
    node: Node, image: Image, admin: ControlClient, plane: RunningControlPlane
) -> None:
    """Whoever holds the node key but not its TPM can start an enrolment (with
    the EK public, which is no secret) but cannot finish it: the node's
    binding and attested state stay as they were."""
    node.attester.enroll(node.client, node.transport_public)
    node.attester.measure(REPOSITORY, image.manifest, image.layers)
    assert node.attester.attest(node.client).passed
    ident = node.attester.identity()
    node.client.enroll(
        Enrollment(
            ek_public=base64.b64encode(ident.ek_public).decode(),
            ak_public=base64.b64encode(ident.ak_public).decode(),
            ak_name=base64.b64encode(ident.ak_name).decode(),
        )
    )
    assert node.unwrap(image, 1) == image.options[1]  # still attested
    with pytest.raises(Forbidden, match="not bound"):  # a guessed credential
        node.attester.activate(node.client, os.urandom(32), node.transport_public)
    assert node.unwrap(image, 1) == image.options[1]
    assert node.attester.attest(node.client).passed  # the bound AK still quotes
