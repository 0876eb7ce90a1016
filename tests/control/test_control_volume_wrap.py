"""The attach key release wrapped to the caller's transport key (control/volume_wrap.py).

In-process, as test_control_volumes.py: real SQLite, file KEK, policy file,
log and file volumes. The attacker holds a node's token (in-process: acts
as its principal) but not the node's transport private key.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from plane_helpers import entries_since, set_policy

from trustplane.api.volume_spec import BackendKind
from trustplane.api.volumes import NewVolume, NewVolumeType
from trustplane.control.identity import Principal
from trustplane.control.models import Attestation
from trustplane.control.policy import DEFAULT_POLICY
from trustplane.control.service import ControlPlane, build
from trustplane.control.settings import ServerSettings, VolumeBackendSettings
from trustplane.errors import Forbidden, IntegrityError, MalformedError, UsageError
from trustplane.volumes.transport_key import NodeTransport

MIB = 1 << 20
ADMIN = Principal("user", "admin", "admin", frozenset())
ALICE = Principal("user", "alice", "user", frozenset())
NODE = Principal("node", "compute-1", "node", frozenset())
NODE_RULE = """\
  - subjects: ["node:compute-1"]
    actions: [volume.attach]
    resources: ["volume:*"]
"""


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    backend = VolumeBackendSettings(kind=BackendKind.FILE, directory=tmp_path / "volumes")
    settings = ServerSettings(data_dir=tmp_path / "data", volume_backends={"files": backend})
    built = build(settings, announce=False)
    built.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))
    set_policy(built, DEFAULT_POLICY + NODE_RULE)
    built.volumes.create(ALICE, NewVolume(name="data", size=8 * MIB, volume_type="secure"))
    yield built
    built.close()


def _key(plane: ControlPlane) -> bytes:
    key_id = plane.volumes.show(ADMIN, "data").key_id
    assert key_id is not None
    return plane.store.unseal(plane.store.find(key_id))  # type: ignore[arg-type]


def _enrol(plane: ControlPlane, certified: NodeTransport) -> None:
    """What enrolment leaves: the AK bound, the transport key the TPM certified."""
    with plane.db.session() as session:
        session.add(
            Attestation(
                node=NODE.name,
                ek_public=b"ek",
                ak_public=b"ak",
                ak_name=b"name",
                bound=True,
                measurements=[],
                last_result="pass",
                last_at=datetime.now(UTC),
                transport_key=certified.public_pem,
            )
        )


def _attach_decisions(plane: ControlPlane, start: int) -> list[tuple[str, str, str | None]]:
    return [
        (e["subject"], e["decision"], e.get("wrapped_to"))
        for e in entries_since(plane, start)
        if e["kind"] == "volume.attach"
    ]


def test_a_node_gets_the_key_only_as_a_jwe_to_the_transport_key_it_sent(
    plane: ControlPlane,
) -> None:
    node, other = NodeTransport.ephemeral(), NodeTransport.ephemeral()
    start, _ = plane.log.head()
    # No transport key: nothing, logged, no attachment.
    with pytest.raises(Forbidden, match="only wrapped to its transport key"):
        plane.volumes.release(NODE, "data", "vm-1")
    assert plane.volumes.show(ADMIN, "data").attachment is None
    with pytest.raises(MalformedError):
        plane.volumes.release(NODE, "data", "vm-1", "-----BEGIN PUBLIC KEY-----\nxx\n")
    assert plane.volumes.show(ADMIN, "data").attachment is None
    released = plane.volumes.release(NODE, "data", "vm-1", node.public_pem)
    assert released.key is None
    assert released.jwe is not None
    # The captured answer: no raw key in it; it opens with the node's private key only.
    key = _key(plane)
    body = released.model_dump_json().encode()
    assert all(needle not in body for needle in (key, key.hex().encode(), base64.b64encode(key)))
    assert node.open(released) == key
    with pytest.raises(IntegrityError, match="not wrapped to our transport key"):
        other.open(released)
    with pytest.raises(UsageError, match="is wrapped"):
        released.key_bytes()
    assert _attach_decisions(plane, start) == [
        ("node:compute-1", "deny", None),
        ("node:compute-1", "deny", None),
        ("node:compute-1", "allow", node.private.kid),
    ]


def test_an_enrolled_node_gets_keys_only_to_its_certified_transport_key(
    plane: ControlPlane,
) -> None:
    """Attacker: a stolen token of an enrolled node, with a transport key of the
    thief's own, under a rule that does NOT ask for attestation."""
    certified, thief = NodeTransport.ephemeral(), NodeTransport.ephemeral()
    _enrol(plane, certified)
    start, _ = plane.log.head()
    with pytest.raises(Forbidden, match="transport key not certified by the TPM"):
        plane.volumes.release(NODE, "data", "vm-1", thief.public_pem)
    assert plane.volumes.show(ADMIN, "data").attachment is None
    [refused] = [e for e in entries_since(plane, start) if e["kind"] == "volume.attach"]
    assert refused["decision"] == "deny"
    assert "transport key not certified by the TPM" in refused["reason"]
    released = plane.volumes.release(NODE, "data", "vm-1", certified.public_pem)
    assert certified.open(released) == _key(plane)
    with pytest.raises(IntegrityError):  # what the thief captured does not open for it
        thief.open(released)


def test_a_user_may_still_take_the_raw_key_or_name_a_transport_key(plane: ControlPlane) -> None:
    """Operators attaching from a workstation (admin here; the policy decides who)."""
    raw = plane.volumes.release(ADMIN, "data", "admin-vm")
    assert raw.jwe is None
    assert raw.key_bytes() == _key(plane)
    plane.volumes.detach(ADMIN, "data", "admin-vm")
    mine = NodeTransport.ephemeral()
    wrapped = plane.volumes.release(ADMIN, "data", "admin-vm", mine.public_pem)
    assert wrapped.key is None
    assert mine.open(wrapped) == _key(plane)
