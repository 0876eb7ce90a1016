"""The edge gateway inside `trustplane agent --gateway-config`: one process, stopped cleanly.

The agent attests with a software TPM while the same process serves the
gateway's socket, as the agent's own node; the real docker CLI works
through it, and SIGTERM ends both and removes the socket.
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path

import docker
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gateway_helpers import PREFIX, DockerCli, container_exists, make_people
from gateway_helpers import cleanup as cleanup
from gateway_helpers import registered_base as registered_base

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.process import ManagedProcess, UnixSocketReady
from trustplane.embedded.swtpm import RunningSwtpm

pytestmark = pytest.mark.usefixtures("cleanup")


def server_pid(path: Path) -> int:
    """The process that listens on a unix socket (its peer credentials)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _, _ = struct.unpack("3i", creds)
    return int(pid)


def agent_command(
    plane: RunningControlPlane, swtpm: RunningSwtpm, node: str, work: Path, config: Path
) -> list[str]:
    return [
        sys.executable, "-m", "trustplane", "agent", "--server", plane.url,
        "--ca", str(plane.ca_file), "--tpm", swtpm.tcti, "--node", node,
        "--node-key", str(work / "node.key"), "--state-dir", str(work / "state"),
        "--interval", "3600", "--gateway-config", str(config),
    ]  # fmt: skip


def test_the_agent_serves_the_gateway_beside_attestation(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    swtpm: RunningSwtpm,
    registered_base: str,
) -> None:
    people = make_people(control_plane, "agt")
    node = f"{PREFIX}-agent-gw"
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "node.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with control_plane.admin() as admin:
        admin.register_node(node, "gateway", public.decode())
    sock = tmp_path / "gw" / "docker.sock"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'listen = "unix://{sock}"\ndocker = "{docker_daemon.base_url}"\n'
        "require_scoped_tokens = false\n[monitor]\nsustain = 60.0\n"
    )
    agent = ManagedProcess(
        "trustplane agent",
        agent_command(control_plane, swtpm, node, tmp_path, config),
        tmp_path,
        ready=UnixSocketReady(sock),
        timeout=120,
    ).start()
    try:
        assert server_pid(sock) == agent.pid  # the agent's own process serves the socket
        user = DockerCli.make(f"unix://{sock}", tmp_path / "user", people.user_token)
        operator = DockerCli.make(f"unix://{sock}", tmp_path / "op", people.operator_token)
        assert "CONTAINER ID" in user.ok("ps")
        name = f"{PREFIX}-agent-run"
        user.refused("run", "--name", name, registered_base, "true", text="normal privilege")
        assert not container_exists(docker_client, name)
        ran = operator.ok("run", "--name", name, registered_base, "echo", "via-agent")
        assert ran.strip() == "via-agent"
        assert agent.running()
    finally:
        agent.stop()
    assert agent.returncode() == 0, agent.log_tail()
    assert not sock.exists()  # closed cleanly: the socket is gone with the agent


def test_a_bad_gateway_config_stops_the_agent_with_one_line(
    tmp_path: Path, control_plane: RunningControlPlane, swtpm: RunningSwtpm
) -> None:
    import subprocess

    config = tmp_path / "gateway.toml"
    config.write_text('listen = "unix:///tmp/x.sock"\nsignature_keys = 3\n')
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "node.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = subprocess.run(
        agent_command(control_plane, swtpm, f"{PREFIX}-agent-bad", tmp_path, config),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "gateway config" in lines[0]
    assert "signature_keys" in lines[0]
    assert not (tmp_path / "state").exists()  # the agent never started
