"""The volume plugin's key lease on its own, with an injected clock: its bounds exactly.

tests/integration/test_volume_plugin_outage.py runs it in the plugin with the
real control plane stopped and dockerd.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trustplane.api.volume_location import FileLocation
from trustplane.api.volume_spec import Engine
from trustplane.errors import UsageError
from trustplane.volumes.attachers.docker_plugin.lease import MAX_KEY_LEASE, KeyLease
from trustplane.volumes.attachers.docker_plugin.service import AttachMaterial


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _material(name: str) -> AttachMaterial:
    location = FileLocation(path=str(Path("/nonexistent") / f"{name}.img"))
    return AttachMaterial(name, location, Engine.QEMU, None, bytes(32))


@pytest.mark.parametrize("seconds", [0, -1, MAX_KEY_LEASE + 1])
def test_a_lease_out_of_bounds_is_refused(seconds: float) -> None:
    with pytest.raises(UsageError, match="at most 3600 seconds"):
        KeyLease(seconds)


def test_a_key_is_usable_until_its_lease_ends_and_forgotten_then() -> None:
    clock = Clock()
    lease = KeyLease(30, clock=clock, wall=lambda: 1_000_000.0)
    assert lease.use("v") is None  # never released here
    lease.keep(_material("v"))
    clock.now += 29.9
    used = lease.use("v")
    assert used is not None
    assert used.key == bytes(32)
    clock.now += 0.1  # exactly 30 s after the release
    assert lease.use("v") is None
    assert not lease.holds("v")
    assert [u.volume for u in lease.uses()] == ["v"]  # one use, kept for the report


def test_using_the_lease_does_not_extend_it_and_a_new_release_does() -> None:
    clock = Clock()
    lease = KeyLease(10, clock=clock)
    lease.keep(_material("v"))
    clock.now += 9
    assert lease.use("v") is not None
    clock.now += 1
    assert lease.use("v") is None
    lease.keep(_material("v"))  # the control plane released it again
    clock.now += 9
    assert lease.use("v") is not None


def test_forget_clear_and_reported() -> None:
    lease = KeyLease(60, clock=Clock())
    for name in ("a", "b", "c"):
        lease.keep(_material(name))
    lease.forget("a", "the control plane refused")
    assert lease.use("a") is None
    assert lease.use("b") is not None
    first = lease.uses()
    assert lease.use("c") is not None
    lease.reported(first)  # sent: only what came after is still to report
    assert [u.volume for u in lease.uses()] == ["c"]
    lease.clear()
    assert not lease.holds("b")
    assert not lease.holds("c")
