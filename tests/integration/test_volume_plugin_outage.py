"""The volume plugin while the control plane cannot be reached, with the real dockerd.

The control plane is stopped (its port refuses connections) and started
again on the same port and data. Without a key lease, a running container
keeps its open volume and a new `docker run -v` fails closed with one line,
leaving nothing behind. With `--key-lease`, a volume released to this node
reopens within the lease, each use logged by the plugin and reported to the
transparency log once the control plane answers; a refusal by the control
plane, a rotated key, the plugin's stop and the lease's end all leave the
node with nothing to open.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from volume_plugin_helpers import (
    NOTHING,
    TAG,
    Stack,
    create_volume,
    files_holding,
    plugin_stack,
    run_on,
    running_container,
)

from trustplane.client import connect_as_node
from trustplane.crypto.node_assertion import load_node_key
from trustplane.embedded.volume_plugin import (
    register_volume_node,
    replace_policy,
    volume_node_rules,
)
from trustplane.errors import Forbidden, UnreachableError, UsageError
from trustplane.volumes.attachers.docker_plugin.control_service import ControlVolumeService
from trustplane.volumes.attachers.docker_plugin.driver import VolumeDriver
from trustplane.volumes.attachers.docker_plugin.lease import KeyLease

UNREACHABLE = "the control plane cannot be reached"
WITHIN = 120.0
"""How long to wait for the plugin to do something it does on its own (poll, not a bound)."""


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with plugin_stack() as started:
        yield started


def _refused(stack: Stack, volume: str) -> str:
    """`docker run -v VOLUME` must fail; its error line."""
    done = stack.docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data", TAG, "true")
    assert done.returncode != 0, stack.plugin.log_text()[-3000:]
    return done.stderr


def _wait_for(what: str, check: object) -> None:
    assert callable(check)
    deadline = time.monotonic() + WITHIN
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.2)


def _lease_reports(stack: Stack) -> list[dict[str, object]]:
    with stack.plane.admin() as admin:
        size = admin.health().log_size
        entries = [json.loads(admin.log_entry(i)) for i in range(size)]
    return [e for e in entries if e["kind"] == "volume.lease"]


def _reported(stack: Stack, volume: str) -> list[dict[str, object]]:
    return [e for e in _lease_reports(stack) if e["volume"] == volume]


def test_without_the_control_plane_open_volumes_stay_and_nothing_new_opens(
    stack: Stack,
) -> None:
    stack.restart_plugin()  # no key lease (the default)
    create_volume(stack, "o-open")
    create_volume(stack, "o-new")
    run_on(stack, "o-new", "true")  # released once before: no lease without --key-lease
    args = ("--network", "none", "-v", "o-open:/data", TAG, "sleep", "600")
    with running_container(stack.docker, *args) as name:
        stack.docker.ok("exec", name, "sh", "-c", "echo before > /data/a && sync")
        opened = stack.left()
        with stack.plane_down():
            # The running container keeps reading and writing its open volume.
            stack.docker.ok("exec", name, "sh", "-c", "echo during > /data/b && sync")
            assert stack.docker.ok("exec", name, "cat", "/data/a", "/data/b").split() == [
                "before", "during",
            ]  # fmt: skip
            # A second container on the volume open here shares that open.
            assert run_on(stack, "o-open", "cat /data/b").strip() == "during"
            # A volume not open here is not opened: one line, nothing left.
            error = _refused(stack, "o-new")
            assert UNREACHABLE in error
            assert "no key lease is configured" in error
            assert "no key lease is configured" in error.splitlines()[0]  # one line
            # dockerd still has it as a trustplane volume: a failed Get would have made it
            # drop the volume and give the container a plain local one of that name.
            driver = stack.docker.ok("volume", "inspect", "--format", "{{.Driver}}", "o-new")
            assert driver.strip() == "trustplane"
            assert stack.left() == opened
            assert not (stack.root / "mounts" / "o-new").exists()
            stack.docker.ok("rm", "-f", name)  # closed while the control plane is away
            assert stack.nothing_left() == NOTHING

        # The control plane hears of the detach once it answers again.
        def detached() -> bool:
            with stack.plane.admin() as admin:
                return admin.volume("o-open").attachment is None

        _wait_for("the detach of o-open", detached)
    assert run_on(stack, "o-new", "ls /data").split() == ["lost+found"]
    assert stack.nothing_left() == NOTHING


def test_with_a_key_lease_the_same_volume_reopens_and_the_use_is_reported(
    stack: Stack,
) -> None:
    stack.restart_plugin("--key-lease", "600")
    create_volume(stack, "l-used")
    create_volume(stack, "l-never")
    run_on(stack, "l-used", "echo leased-marker > /data/m && sync")  # released: leased
    before = len(_reported(stack, "l-used"))
    # Attacker: another node the policy lets attach volumes, asking for the key while
    # this node may still open the volume on its own: the attachment stays with the lease.
    other = "docker-host-2"
    with stack.plane.admin() as admin:
        assert admin.volume("l-used").attachment is not None
        other_key = load_node_key(register_volume_node(admin, stack.top, other).read_bytes(), "")
    rules = volume_node_rules(stack.node) + volume_node_rules(other)
    replace_policy(stack.plane, stack.base_policy + rules)
    url, ca = stack.plane.url, stack.plane.ca_file
    elsewhere = ControlVolumeService(lambda: connect_as_node(url, other, other_key, ca))
    try:
        with pytest.raises(UsageError, match="attached"):
            elsewhere.attach("l-used")
    finally:
        stack.allow_all()
    with stack.plane_down():
        assert run_on(stack, "l-used", "cat /data/m").strip() == "leased-marker"
        assert stack.nothing_left() == NOTHING
        assert "l-used: the control plane cannot be reached; opening it with the key" in (
            stack.plugin.log_text()
        )
        # Only a volume whose key was released here since the plugin started.
        error = _refused(stack, "l-never")
        assert "holds no live key lease" in error
        assert stack.nothing_left() == NOTHING
    _wait_for("the lease use's report", lambda: len(_reported(stack, "l-used")) > before)
    entry = _reported(stack, "l-used")[-1]
    assert entry["node"] == f"node:{stack.node}"
    assert entry["domain"] == "docker"
    assert float(str(entry["released"])) <= float(str(entry["reported"]))
    stack.docker.ok("volume", "rm", "l-used")  # ends the lease and its attachment first


def test_a_refusal_ends_the_lease_and_is_not_overridden_by_an_outage(stack: Stack) -> None:
    """Attacker: the node's own operator, who after a policy change cuts the node off the
    control plane to fall back on the key leased before the change."""
    stack.restart_plugin("--key-lease", "600")
    create_volume(stack, "r-denied")
    run_on(stack, "r-denied", "true")  # leased
    replace_policy(stack.plane, stack.base_policy + volume_node_rules(stack.node, denied=("r-*",)))
    try:
        assert "policy refuses volume.attach of volume:r-denied" in _refused(stack, "r-denied")
        with stack.plane_down():
            error = _refused(stack, "r-denied")
            assert UNREACHABLE in error
            assert "holds no live key lease" in error
            assert stack.nothing_left() == NOTHING
    finally:
        stack.allow_all()
    assert "r-denied: key lease ended (the control plane refused)" in stack.plugin.log_text()


def test_a_rotated_key_leaves_the_leased_one_useless(stack: Stack) -> None:
    """Attacker: as above, after an administrator detached the volume from the node and
    rotated its key (the old key destroyed, its key slot removed) while the node held the
    old key in its lease."""
    stack.restart_plugin("--key-lease", "600")
    create_volume(stack, "r-rotated")
    run_on(stack, "r-rotated", "true")  # the old key is leased
    with stack.plane.admin() as admin:
        old_key = admin.volume("r-rotated").key_id
        with pytest.raises(UsageError, match="attached to domain docker"):
            admin.rotate_volume_key("r-rotated")  # the lease keeps it attached to the node
        admin.detach_volume("r-rotated", "docker")  # the administrator takes it back
        assert admin.rotate_volume_key("r-rotated").key_id != old_key
    with stack.plane_down():
        assert _refused(stack, "r-rotated")  # the leased key opens nothing
        assert stack.nothing_left() == NOTHING
        error = _refused(stack, "r-rotated")  # and is gone after that failed open
        assert "holds no live key lease" in error
    assert run_on(stack, "r-rotated", "ls /data").split() == ["lost+found"]


def test_the_lease_ends_at_plugin_stop_and_at_expiry(stack: Stack) -> None:
    create_volume(stack, "e-stop")
    with stack.plane.admin() as admin:  # the key, as an admin sees it
        key = admin.attach_volume("e-stop", "probe").key_bytes()
        admin.detach_volume("e-stop", "probe")
    stack.restart_plugin("--key-lease", "600")
    run_on(stack, "e-stop", "true")
    needles = [key, key.hex().encode(), base64.b64encode(key)]
    assert files_holding(stack.root, needles) == []  # the lease is in memory only
    assert files_holding(stack.plugin.work, needles) == []
    stack.restart_plugin("--key-lease", "600")
    create_volume(stack, "e-short")
    stack.restart_plugin("--key-lease", "1")
    run_on(stack, "e-short", "true")
    _wait_for(
        "the lease's end",
        lambda: "e-short: key lease ended (expired)" in stack.plugin.log_text(),
    )

    def detached(name: str) -> bool:
        with stack.plane.admin() as admin:
            return admin.volume(name).attachment is None

    assert detached("e-stop")  # the plugin's stop ended the lease and its attachment
    _wait_for("the detach at the lease's end", lambda: detached("e-short"))
    with stack.plane_down():
        for volume in ("e-stop", "e-short"):
            assert "holds no live key lease" in _refused(stack, volume)
        assert stack.nothing_left() == NOTHING


def test_within_the_lease_a_remount_works_after_it_not(stack: Stack, tmp_path: Path) -> None:
    """The driver in this process with an injected clock: the lease's bound exactly."""
    now = [1000.0]
    key = load_node_key(stack.plugin.node_key.read_bytes(), "node key")
    url, ca = stack.plane.url, stack.plane.ca_file
    service = ControlVolumeService(lambda: connect_as_node(url, stack.node, key, ca))
    driver = VolumeDriver(service, tmp_path / "root", key_lease=KeyLease(60, clock=lambda: now[0]))
    driver.start()
    try:
        create_volume(stack, "c-clock")
        driver.mount("c-clock", "a")  # released: leased at clock 1000
        driver.unmount("c-clock", "a")
        with stack.plane_down():
            now[0] += 59.0
            driver.mount("c-clock", "b")
            assert driver.path("c-clock")
            driver.unmount("c-clock", "b")
            now[0] += 1.0
            with pytest.raises(UnreachableError, match="holds no live key lease"):
                driver.mount("c-clock", "c")
            assert not (tmp_path / "root" / "mounts" / "c-clock").exists()
        driver.tend()  # the control plane answers: the use is reported, the lease's
        assert len(_reported(stack, "c-clock")) == 1  # attachment cleared
        with stack.plane.admin() as admin:
            assert admin.volume("c-clock").attachment is None
        replace_policy(
            stack.plane, stack.base_policy + volume_node_rules(stack.node, denied=("c-*",))
        )
        with pytest.raises(Forbidden):
            driver.mount("c-clock", "d")
    finally:
        stack.allow_all()
        driver.close_all()
        driver.stop()
