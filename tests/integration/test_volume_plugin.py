"""The Docker volume plugin with the real dockerd, control plane and QEMU tools.

`docker volume create -d trustplane` creates a volume through the control
plane; containers write and read it through the plugin's user-space open
(qemu-storage-daemon, FUSE, loop device, ext4); the raw file holds no
plaintext. The plugin survives its restart and its `kill -9` (with or
without the daemon it started), a refused key release leaves nothing
behind, and the key is never in argv, an environment, a log or a file.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_helpers import entries_since
from gateway_helpers import DockerCli, make_people, register_local_image, start_gateway
from volume_plugin_helpers import (
    MIB,
    NOTHING,
    TAG,
    VOLUME_TYPE,
    Stack,
    create_volume,
    file_holds,
    files_holding,
    mounts_under,
    plugin_stack,
    processes_holding,
    run_on,
    running_container,
)

from trustplane.api.volumes import VolumeKeyRelease
from trustplane.client import connect_as_node
from trustplane.crypto.node_assertion import load_node_key
from trustplane.embedded.process import ManagedProcess, unix_socket_accepts
from trustplane.embedded.swtpm import RunningSwtpm
from trustplane.embedded.volume_plugin import (
    register_volume_node,
    replace_policy,
    volume_node_rules,
)
from trustplane.errors import Forbidden, IntegrityError, TrustplaneError, UsageError
from trustplane.volumes.attachers.docker_plugin.control_service import ControlVolumeService
from trustplane.volumes.header import LUKS_MAGIC
from trustplane.volumes.transport_key import NodeTransport


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with plugin_stack() as started:
        yield started


_create = create_volume
_run = run_on


def _key_of(stack: Stack, name: str) -> bytes:
    """The volume key, fetched as an admin would (an attach to another domain, then detach):
    what the attacker tests look for."""
    with stack.plane.admin() as admin:
        release = admin.attach_volume(name, "probe")
        admin.detach_volume(name, "probe")
    return release.key_bytes()


def _needles(key: bytes) -> list[bytes]:
    """The key as raw bytes, as the LUKS passphrase (hex) and as base64."""
    return [key, key.hex().encode(), base64.b64encode(key)]


def test_a_container_writes_and_a_second_reads_back_no_plaintext_on_the_backend(
    stack: Stack,
) -> None:
    _create(stack, "v1")
    listed = stack.docker.ok("volume", "ls", "--format", "{{.Driver}} {{.Name}}")
    assert "trustplane v1" in listed.splitlines()
    marker = "confidential-marker-7d1f3e"
    _run(stack, "v1", f"echo {marker} > /data/note && sync")
    # The container is gone: the volume is closed, its key forgotten here.
    assert stack.nothing_left() == NOTHING
    with stack.plane.admin() as admin:
        assert admin.volume("v1").attachment is None
    assert _run(stack, "v1", "cat /data/note").strip() == marker
    raw = stack.volumes / "v1.img"
    assert raw.read_bytes()[:6] == LUKS_MAGIC
    assert not file_holds(raw, marker.encode())
    assert stack.nothing_left() == NOTHING


def test_two_containers_share_one_open_and_the_last_one_closes_it(stack: Stack) -> None:
    _create(stack, "v-shared")
    args = ("--network", "none", "-v", "v-shared:/data", TAG, "sleep", "600")
    with running_container(stack.docker, *args) as first:
        opened = stack.left()
        assert len(opened["daemons"]) == 1
        assert len(opened["loop devices"]) == 1
        with running_container(stack.docker, *args) as second:
            stack.docker.ok("exec", first, "sh", "-c", "echo one > /data/one && sync")
            assert stack.docker.ok("exec", second, "cat", "/data/one").strip() == "one"
            assert stack.left()["daemons"] == opened["daemons"]  # one open, two users
        assert stack.left()["daemons"] == opened["daemons"]  # still used by the first
    assert stack.nothing_left() == NOTHING


def test_the_key_is_in_no_argv_environment_log_or_file_while_open(stack: Stack) -> None:
    """Attacker: a local user who reads every process's argv and environment (ps, /proc)
    and the plugin's files and log; the key must be in none of them."""
    _create(stack, "v-secret")
    key = _key_of(stack, "v-secret")
    needles = _needles(key)
    args = ("--network", "none", "-v", "v-secret:/data", TAG, "sleep", "600")
    with running_container(stack.docker, *args):
        assert stack.left()["daemons"], "the volume is open"
        assert processes_holding(needles) == []
        assert files_holding(stack.root, needles, skip=(stack.root / "mounts",)) == []
        assert files_holding(stack.plugin.work, needles) == []  # the plugin's logs
        # Where the executor's secret files go (removed once the daemon has read them),
        # and the temporary directory the tools use.
        for scratch in (Path("/dev/shm"), Path(tempfile.gettempdir())):
            for entry in scratch.glob("trustplane-*"):
                assert files_holding(entry, needles) == [], entry
        assert not any(n in stack.plugin.log_text().encode() for n in needles)


def test_a_volume_open_on_this_node_is_refused_to_another_node(stack: Stack) -> None:
    """Attacker: another registered node the policy lets attach volumes, asking for the
    key of a volume a container uses here."""
    other = "docker-host-2"
    with stack.plane.admin() as admin:
        key_file = register_volume_node(admin, stack.top, other)
    rules = volume_node_rules(stack.node) + volume_node_rules(other)
    replace_policy(stack.plane, stack.base_policy + rules)
    signing = load_node_key(key_file.read_bytes(), str(key_file))
    elsewhere = ControlVolumeService(
        lambda: connect_as_node(stack.plane.url, other, signing, stack.plane.ca_file)
    )
    try:
        _create(stack, "v-excl")
        args = ("--network", "none", "-v", "v-excl:/data", TAG, "sleep", "600")
        with running_container(stack.docker, *args), pytest.raises(UsageError, match="attached"):
            elsewhere.attach("v-excl")
        assert stack.nothing_left() == NOTHING
        material = elsewhere.attach("v-excl")  # closed here: the other node may have it now
        assert len(material.key) == 32
        elsewhere.detached("v-excl")
    finally:
        stack.allow_all()


def test_plugin_socket_answers_root_only(stack: Stack) -> None:
    """Attacker: a local non-root user; whoever talks to the socket opens volumes."""
    socket = stack.plugin.socket
    assert socket.stat().st_mode & 0o777 == 0o600
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\n"
        "else:\n    print('connected')\n"
    )
    # The plugin directory itself is 0700, so nobody else even reaches the socket.
    seen = subprocess.run(
        ["python3", "-c", probe, str(socket)], capture_output=True, text=True, user=65534,
        check=False,
    )  # fmt: skip
    assert seen.stdout.strip() == "refused", seen


def test_restart_while_mounted_loses_no_data(stack: Stack) -> None:
    _create(stack, "v-restart")
    args = ("--network", "none", "-v", "v-restart:/data", TAG, "sleep", "600")
    with running_container(stack.docker, *args) as name:
        stack.docker.ok("exec", name, "sh", "-c", "echo before > /data/a && sync")
        daemons = stack.left()["daemons"]
        stack.plugin.stop()
        assert stack.left()["daemons"] == daemons  # the container's volume stays open
        stack.plugin.start()
        assert "adopted ['v-restart']" in stack.plugin.log_text()
        stack.docker.ok("exec", name, "sh", "-c", "echo after > /data/b && sync")
    # Unmount went to the restarted plugin, which closed what it adopted.
    assert stack.nothing_left() == NOTHING
    assert _run(stack, "v-restart", "cat /data/a /data/b").split() == ["before", "after"]


def test_kill9_of_the_plugin_leaves_no_stale_mount_after_restart(stack: Stack) -> None:
    _create(stack, "v-kill")
    args = ("--network", "none", "-v", "v-kill:/data", TAG, "sleep", "600")
    with running_container(stack.docker, *args) as name:
        stack.docker.ok("exec", name, "sh", "-c", "echo kept > /data/k && sync")
        stack.plugin.kill9()
        stack.plugin.start()
        assert "adopted ['v-kill']" in stack.plugin.log_text()
        assert len(stack.left()["daemons"]) == 1
        stack.docker.ok("exec", name, "sh", "-c", "echo more > /data/m && sync")
    assert stack.nothing_left() == NOTHING
    assert _run(stack, "v-kill", "cat /data/k /data/m").split() == ["kept", "more"]


def test_kill9_of_plugin_and_daemon_clears_the_stale_fuse_mount_and_reopens(
    stack: Stack,
) -> None:
    """The whole service killed (a cgroup kill): the FUSE export is left dead
    (`Transport endpoint is not connected`); the restart clears it and opens the
    volume again for the container Docker still counts."""
    _create(stack, "v-dead")
    args = ("--network", "none", "-v", "v-dead:/data", TAG, "sleep", "600")
    with running_container(stack.docker, *args) as name:
        stack.docker.ok("exec", name, "sh", "-c", "echo synced > /data/s && sync")
        (daemon_pid,) = stack.left()["daemons"]
        stack.plugin.kill9()
        subprocess.run(["kill", "-9", str(daemon_pid)], check=True)
        stale = [p for p, kind in mounts_under(stack.root) if kind.startswith("fuse")]
        assert stale, "the dead daemon left its FUSE export mounted"
        stack.plugin.start()
        assert "opened again ['v-dead']" in stack.plugin.log_text()
        for point, _ in mounts_under(stack.root):
            Path(point).stat()  # raises ENOTCONN on a stale FUSE mount
        assert len(stack.left()["daemons"]) == 1
    assert stack.nothing_left() == NOTHING
    assert _run(stack, "v-dead", "cat /data/s").strip() == "synced"


def test_refused_key_release_fails_docker_run_and_leaves_nothing(stack: Stack) -> None:
    _create(stack, "locked-1")
    replace_policy(
        stack.plane, stack.base_policy + volume_node_rules(stack.node, denied=("locked-*",))
    )
    try:
        refused = stack.docker(
            "run", "--rm", "--network", "none", "-v", "locked-1:/data", TAG, "true"
        )
        assert refused.returncode != 0
        assert "policy refuses volume.attach of volume:locked-1" in refused.stderr
        assert stack.nothing_left() == NOTHING
        assert not (stack.root / "mounts" / "locked-1").exists()
        with stack.plane.admin() as admin:
            assert admin.volume("locked-1").attachment is None
    finally:
        stack.allow_all()
    assert _run(stack, "locked-1", "ls /data").split() == ["lost+found"]


def test_create_refuses_bad_options_and_leaves_no_volume(stack: Stack) -> None:
    bad = stack.docker("volume", "create", "-d", "trustplane", "--opt", "type=secure", "v-nosize")
    assert bad.returncode != 0
    assert "needs --opt size=SIZE" in bad.stderr
    odd = stack.docker(
        "volume", "create", "-d", "trustplane", "--opt", "type=secure", "--opt", "size=64M",
        "--opt", "fs=xfs", "v-odd",
    )  # fmt: skip
    assert odd.returncode != 0
    assert "unknown option 'fs'" in odd.stderr
    with stack.plane.admin() as admin:
        names = {v.name for v in admin.volumes()}
    assert not {"v-nosize", "v-odd"} & names


def test_remove_destroys_key_and_storage(stack: Stack) -> None:
    _create(stack, "v-gone", size=f"{8 * MIB}")
    with stack.plane.admin() as admin:
        key_id = admin.volume("v-gone").key_id
    assert key_id is not None
    stack.docker.ok("volume", "rm", "v-gone")
    assert not (stack.volumes / "v-gone.img").exists()
    with stack.plane.admin() as admin, pytest.raises(TrustplaneError):
        admin.volume("v-gone")


def test_through_the_gateway_a_named_volume_is_authorized_like_any_start(stack: Stack) -> None:
    """The gateway in front of dockerd: a trustplane volume by name is not a host-path
    bind; host paths, foreign options and foreign drivers still are (attacker: an
    operator of this gateway)."""
    people = make_people(stack.plane, "volumes")
    client = stack.daemon.client()
    try:
        register_local_image(stack.plane, client, TAG)
    finally:
        client.close()
    gateways = start_gateway(stack.top / "gw", stack.plane, stack.daemon)
    gateway = next(gateways)
    try:
        operator = DockerCli.make(gateway.host, stack.top / "op", people.operator_token)
        user = DockerCli.make(gateway.host, stack.top / "user", people.user_token)
        operator.ok(
            "volume", "create", "-d", "trustplane",
            "--opt", f"type={VOLUME_TYPE}", "--opt", "size=64M", "v-gw",
        )  # fmt: skip
        ran = operator.ok("run", "--rm", "--network", "none", "-v", "v-gw:/data", TAG,
                          "sh", "-c", "echo through-gw > /data/x && cat /data/x")  # fmt: skip
        assert ran.strip() == "through-gw"
        mount = "type=volume,src=v-gw,dst=/data,volume-driver=trustplane"
        read = operator.ok("run", "--rm", "--network", "none", "--mount", mount, TAG,
                           "cat", "/data/x")  # fmt: skip
        assert read.strip() == "through-gw"
        user.refused("run", "--rm", "--network", "none", "-v", "v-gw:/data", TAG, "true",
                     text="normal privilege")  # fmt: skip
        operator.refused("run", "--rm", "--network", "none", "-v", "/etc:/data", TAG, "true",
                         text="host-bind access")  # fmt: skip
        operator.refused("volume", "create", "-d", "trustplane", "--opt", "device=/etc",
                         "v-evil", text="host-bind access")  # fmt: skip
        operator.refused("volume", "create", "-d", "local", "--opt", "type=none",
                         "--opt", "o=bind", "--opt", "device=/etc", "v-evil2",
                         text="host-bind access")  # fmt: skip
    finally:
        gateways.close()
    assert stack.nothing_left() == NOTHING


def test_the_agent_serves_the_plugin_and_attestation_gates_the_keys(
    stack: Stack, swtpm: RunningSwtpm
) -> None:
    """`trustplane agent --volume-plugin`: with a rule that asks for attestation, a
    node that never attested gets no key (attacker: a node whose TPM state is not
    vouched for); the agent attests, then the same mount works."""
    _create(stack, "v-attested")
    replace_policy(stack.plane, stack.base_policy + volume_node_rules(stack.node, attested=True))
    agent: ManagedProcess | None = None
    try:
        refused = stack.docker(
            "run", "--rm", "--network", "none", "-v", "v-attested:/data", TAG, "true"
        )
        assert refused.returncode != 0
        assert "attest" in refused.stderr
        assert stack.nothing_left() == NOTHING
        stack.plugin.stop()
        plugin = stack.plugin
        agent = ManagedProcess(
            "agent-volume-plugin",
            [
                sys.executable, "-m", "trustplane", "agent",
                "--server", stack.plane.url, "--ca", str(stack.plane.ca_file),
                "--node", stack.node, "--node-key", str(plugin.node_key),
                "--tpm", swtpm.tcti, "--state-dir", str(stack.top / "agent-state"),
                "--volume-plugin", "--plugin-socket", str(plugin.socket),
                "--plugin-root", str(plugin.root),
            ],
            stack.top / "work",
            ready=lambda: unix_socket_accepts(plugin.socket),
            timeout=120,
            grace=30,
        ).start()  # fmt: skip
        deadline = time.monotonic() + 120
        while "attested: quote verified" not in agent.log_file.read_text(errors="replace"):
            assert agent.running(), agent.log_tail()
            assert time.monotonic() < deadline, agent.log_tail()
            time.sleep(0.2)
        assert _run(stack, "v-attested", "ls /data").split() == ["lost+found"]
        assert stack.nothing_left() == NOTHING
        _the_release_opens_only_with_the_certified_transport_key(
            stack, "v-attested", stack.top / "agent-state"
        )
    finally:
        if agent is not None:
            agent.stop()
        stack.allow_all()
        if stack.plugin.process is None or not stack.plugin.process.running():
            stack.plugin.start()


def _the_release_opens_only_with_the_certified_transport_key(
    stack: Stack, name: str, state_dir: Path
) -> None:
    """Attacker: the enrolled node's token (its node key file) without its transport
    private key, and whoever captured an attach answer (a TLS-terminating proxy, a
    log of HTTP bodies)."""
    key = _key_of(stack, name)
    certified = NodeTransport.of_node(state_dir)
    thief = NodeTransport.ephemeral()
    signing = load_node_key(stack.plugin.node_key.read_bytes(), str(stack.plugin.node_key))
    path = f"/v1/volumes/{name}/attachment"
    with stack.plane.admin() as admin:
        start = admin.health().log_size
    with connect_as_node(stack.plane.url, stack.node, signing, stack.plane.ca_file) as node:
        with pytest.raises(Forbidden, match="transport key not certified by the TPM"):
            node.attach_volume(name, "thief-vm", thief.public_pem)
        with pytest.raises(Forbidden, match="only wrapped to its transport key"):
            node.attach_volume(name, "thief-vm")
        answer = node.request(
            "POST", path, json={"domain": "probe", "transport_key": certified.public_pem}
        )
        node.detach_volume(name, "probe")
    assert answer.status_code == 200, answer.text
    captured = answer.text
    # What the wire carried: a JWE, no raw-key field, the key in no encoding.
    assert '"key"' not in captured
    assert not any(needle in captured.encode() for needle in _needles(key))
    release = VolumeKeyRelease.model_validate_json(captured)
    assert release.key is None
    assert release.jwe is not None
    with pytest.raises(IntegrityError, match="not wrapped to our transport key"):
        release.key_bytes(thief.private)
    with pytest.raises(UsageError, match="is wrapped"):
        release.key_bytes()
    assert certified.open(release) == key
    with stack.plane.admin() as admin:
        decisions = [
            (e["decision"], e["domain"], e["reason"])
            for e in entries_since(admin, start)
            if e["kind"] == "volume.attach" and e["subject"] == f"node:{stack.node}"
        ]
    assert [(d, domain) for d, domain, _ in decisions] == [
        ("deny", "thief-vm"),
        ("deny", "thief-vm"),
        ("allow", "probe"),
    ]
    assert "transport key not certified by the TPM" in decisions[0][2]
