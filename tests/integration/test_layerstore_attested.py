"""The layer store on an attested node: layers measured into the TPM before any key.

A real swtpm, control plane, registry and dockerd. The policy releases image
keys to `node:ls-*` only with attestation. A node enrolled by `trustplane
agent` imports the KMS-encrypted app image into its store and runs it: each
layer's diff_id and plain blob digest is in its event log (and so in the
measurement PCR), and the control plane released the layer-chain keys to it after a
fresh quote that showed them. A node that never enrolled its TPM, and a node
that asks for a key without measuring the layers, get nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import APP_SECRET, start_control_plane_or_fail
from control_helpers import Cli, add_policy_rule, entries_since, log_size
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk

from trustplane.agent.attester import LOG_FILE, EventLog
from trustplane.agent.layer_store import node_keys
from trustplane.agent.service import Agent, AgentConfig
from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.swtpm import RunningSwtpm
from trustplane.errors import ExitCode, Forbidden
from trustplane.layerstore import LayerStore
from trustplane.trust.attestation import Event

sys.path.insert(0, str(Path(__file__).parents[1] / "layerstore"))
from store_checks import clean, leftovers

RECIPIENT = "ls-attested"
RULES = """\
  - subjects: ["node:ls-*"]
    actions: [key.release]
    resources: ["image:*"]
    require_attestation: true
  - subjects: ["node:ls-*"]
    actions: [secret.create]
    resources: ["*"]
"""


@dataclass(frozen=True)
class Node:
    name: str
    key: Path
    state: Path

    def args(self, plane: RunningControlPlane, swtpm: RunningSwtpm) -> list[str]:
        return [
            "--server",
            plane.url,
            "--ca",
            str(plane.ca_file),
            "--node",
            self.name,
            "--node-key",
            str(self.key),
            "--tpm",
            swtpm.tcti,
            "--state-dir",
            str(self.state),
        ]

    def events(self) -> list[Event]:
        log = EventLog.load(self.state / LOG_FILE)
        return log.events if log is not None else []


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    server = start_control_plane_or_fail(tmp_path_factory.mktemp("ls-attested"))
    add_policy_rule(server, RULES)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(plane: RunningControlPlane) -> Iterator[ControlClient]:
    client = plane.admin()
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(
    plane: RunningControlPlane,
    admin: ControlClient,
    registry_plain: RunningRegistry,
    app_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """docker://HOST/ls/app:1, layers 1 and 2 for the KMS recipient, registered."""
    cli = Cli(tmp_path_factory.mktemp("ls-attested-admin") / "admin.json")
    cli.login(plane, "admin", plane.admin_password)
    admin.create_recipient(RECIPIENT)
    target = f"docker://{registry_plain.host}/ls/app:1"
    result = cli(
        "image",
        "encrypt",
        f"docker-daemon:{app_image}",
        target,
        "--recipient",
        f"kms:{RECIPIENT}",
        "--layers",
        "1,2",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    return target


def new_node(admin: ControlClient, tmp_path: Path) -> Node:
    name = f"ls-{os.urandom(3).hex()}"
    signing = ec.generate_private_key(ec.SECP256R1())
    key = tmp_path / f"{name}.key"
    key.write_bytes(jwk.JWK.from_pyca(signing).export_to_pem(private_key=True, password=None))
    admin.register_node(name, "host", jwk.JWK.from_pyca(signing).export_to_pem().decode())
    return Node(name, key, tmp_path / f"{name}-state")


def trustplane(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRUSTPLANE_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", "trustplane", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "store"
    prefix = os.fspath(tmp_path) + "/"
    left = leftovers(prefix)
    clean(prefix)
    assert left == []


def test_an_attested_node_measures_every_layer_then_gets_the_keys(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    image: str,
    tmp_path: Path,
    store_dir: Path,
) -> None:
    node = new_node(admin, tmp_path)
    code, out, err = trustplane("agent", *node.args(plane, swtpm), "--once")
    assert code == 0, err
    start = log_size(plane)
    code, out, err = trustplane(
        "store", "import", image, "--kms", "--size", "1G", "--store", str(store_dir),
        *node.args(plane, swtpm), "--quiet", "--json",
    )  # fmt: skip
    assert code == 0, err
    stored = LayerStore(store_dir).find(json.loads(out)["id"])
    measured = {(e.layer, e.kind, e.digest) for e in node.events()}
    for layer in stored.layers:
        assert (layer.index, "diff_id", layer.diff_id) in measured
        assert (layer.index, "blob", layer.digest) in measured
    assert {e.image for e in node.events()} == {stored.repository}
    assert {e.manifest for e in node.events()} == {stored.manifest_digest}
    entries = entries_since(admin, start)
    released = [e for e in entries if e["kind"] == "layerchain.key"]
    assert [(e["subject"], e["layer"], e["decision"]) for e in released] == [
        (f"node:{node.name}", 2, "allow")
    ]
    assert "node attested" in released[0]["reason"]

    before = len(node.events())
    code, out, err = trustplane(
        "store", "run", stored.id, "--store", str(store_dir), *node.args(plane, swtpm),
        "--", "cat", "/secrets/token",
    )  # fmt: skip
    assert code == 0, err
    assert out.encode() == APP_SECRET
    assert len(node.events()) == before, "the view's layers were measured already"


def test_a_node_that_never_enrolled_gets_nothing(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    image: str,
    tmp_path: Path,
    store_dir: Path,
) -> None:
    node = new_node(admin, tmp_path)
    start = log_size(plane)
    code, _, err = trustplane(
        "store", "import", image, "--kms", "--size", "1G", "--store", str(store_dir),
        *node.args(plane, swtpm),
    )  # fmt: skip
    assert code == ExitCode.AUTH, err
    assert err.startswith("trustplane: error: attestation: ")
    assert "has not enrolled" in err
    assert LayerStore(store_dir).images() == []
    kinds = {e["kind"] for e in entries_since(admin, start)}
    assert not kinds & {"layerchain.create", "layerchain.key", "kms.unwrap"}


def test_keys_need_the_layers_measured_in_a_fresh_quote(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    tmp_path: Path,
) -> None:
    """An enrolled, attested node that did not measure the layers asks the broker directly."""
    node = new_node(admin, tmp_path)
    code, _, err = trustplane("agent", *node.args(plane, swtpm), "--once")
    assert code == 0, err
    agent = Agent(
        AgentConfig(
            server_url=plane.url,
            tcti=swtpm.tcti,
            node=node.name,
            node_key=node.key,
            state_dir=node.state,
            ca_file=plane.ca_file,
        )
    )
    with agent.client() as client:
        keys, _ = node_keys(agent, client)
        with pytest.raises(Forbidden, match=r"layers \[0, 1\] of \S+ not measured"):
            keys.create_chain("example.org/unmeasured", "sha256:" + "2" * 64, 2)
