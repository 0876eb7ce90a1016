"""The layer store with the control plane holding its keys, driven through the CLI.

One `trustplane server` for the module, the session's plain registry and
Docker. The app image (0 busybox base, 1 /app, 2 /secrets/token) is
encrypted for a KMS recipient and pushed; an operator stores it on a node
with named tiers; a contractor whose policy reaches layer 1 runs the tier-1
view and cannot open layer 2; a key of another image opens nothing; removal
destroys the keys first. Attackers: the contractor (a valid login whose
policy stops at layer 1), someone holding another image's keys, someone
reading the node's disk.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import APP_SECRET, start_control_plane_or_fail
from control_helpers import Cli, add_policy_rule, assert_fails, entries_since, log_size

from trustplane.crypto.key_chain import chain_below
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.registry import RunningRegistry
from trustplane.errors import DecryptionKeyError, ExitCode, Forbidden, NotFoundError
from trustplane.layerstore import ChainRef, ControlPlaneKeys, LayerStore
from trustplane.layerstore.keys import Transport

sys.path.insert(0, str(Path(__file__).parents[1] / "layerstore"))
from store_checks import clean, leftovers

RECIPIENT = "layerstore-kms"
SECRET = APP_SECRET.strip()


@dataclass(frozen=True)
class Setup:
    plane: RunningControlPlane
    admin: Cli
    contractor: Cli
    contractor_subject: str
    reference: str
    repository: str
    store: Path


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    registry_plain: RunningRegistry,
    app_image: str,
) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("layerstore-control")
    plane = start_control_plane_or_fail(work)
    admin = Cli(work / "admin.json")
    admin.login(plane, "admin", plane.admin_password)
    with plane.admin() as client:
        client.create_user("contractor", "user", "contractor-pass-0123")
    contractor = Cli(work / "contractor.json")
    contractor.login(plane, "contractor", "contractor-pass-0123")
    assert admin("recipient", "create", RECIPIENT).returncode == 0
    repository = f"{registry_plain.host}/layerstore/app"
    reference = f"docker://{repository}:1"
    encrypted = admin(
        "image",
        "encrypt",
        f"docker-daemon:{app_image}",
        reference,
        "--recipient",
        f"kms:{RECIPIENT}",
        "--layers",
        "1,2",
        "--quiet",
    )
    assert encrypted.returncode == 0, encrypted.stderr
    add_policy_rule(
        plane,
        '  - subjects: ["user:contractor"]\n'
        "    actions: [key.release]\n"
        f'    resources: ["image:{repository}"]\n'
        "    max_layer: 1\n",
    )
    store = work / "store"
    yield Setup(plane, admin, contractor, "user:contractor", reference, repository, store)
    prefix = os.fspath(work) + "/"
    left = leftovers(prefix)
    clean(prefix)
    plane.stop()
    assert left == []


@pytest.fixture(scope="module")
def stored(setup: Setup) -> dict[str, object]:
    """The operator's import: decrypted through the KMS straight into the store."""
    result = setup.admin(
        "store",
        "import",
        setup.reference,
        "--kms",
        "--tiers",
        "contractor=1,operator=2",
        "--size",
        "1G",
        "--store",
        str(setup.store),
        "--quiet",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def _keys(plane: RunningControlPlane, user: str, password: str) -> Iterator[ControlPlaneKeys]:
    client = plane.client()
    client.login(user, password)
    try:
        yield ControlPlaneKeys(client)
    finally:
        client.close()


@pytest.fixture
def admin_keys(setup: Setup) -> Iterator[ControlPlaneKeys]:
    yield from _keys(setup.plane, "admin", setup.plane.admin_password)


@pytest.fixture
def contractor_keys(setup: Setup) -> Iterator[ControlPlaneKeys]:
    yield from _keys(setup.plane, "contractor", "contractor-pass-0123")


def test_import_decrypts_into_the_store_and_lists_it(
    setup: Setup, stored: dict[str, object]
) -> None:
    assert stored["repository"] == setup.repository
    assert stored["layers"] == 3
    assert stored["tiers"] == {"contractor": 1, "operator": 2}
    listed = setup.admin("store", "ls", "--store", str(setup.store), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [image["id"] for image in json.loads(listed.stdout)] == [stored["id"]]
    inspected = setup.admin(
        "store", "inspect", str(stored["id"]), "--store", str(setup.store), "--json"
    )
    details = json.loads(inspected.stdout)
    assert [layer["encryptedInSource"] for layer in details["layerDetails"]] == [False, True, True]
    assert details["chain"]["server"] == setup.plane.url
    # The raw layer files hold none of the secret, and no key.
    for path in (setup.store / "qcow2" / "layers").iterdir():
        raw = path.read_bytes()
        assert SECRET not in raw
        assert base64.b64encode(SECRET) not in raw


def test_the_operator_runs_the_full_view_and_reads_the_secret(
    setup: Setup, stored: dict[str, object]
) -> None:
    ran = setup.admin(
        "store",
        "run",
        str(stored["name"]),
        "--store",
        str(setup.store),
        "--",
        "cat",
        "/secrets/token",
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.encode().strip() == SECRET


def test_the_contractor_runs_tier_1_and_cannot_open_layer_2(
    setup: Setup, stored: dict[str, object]
) -> None:
    start = log_size(setup.plane)
    name = str(stored["name"])
    ran = setup.contractor(
        "store",
        "run",
        name,
        "--tier",
        "contractor",
        "--store",
        str(setup.store),
        "--",
        "/bin/sh",
        "-c",
        "cat /app/config.txt; ls /secrets",
    )
    assert ran.returncode != 0
    assert "hello from the public app layer" in ran.stdout
    assert "/secrets: No such file or directory" in ran.stderr
    refused = setup.contractor(
        "store",
        "run",
        name,
        "--tier",
        "2",
        "--store",
        str(setup.store),
        "--",
        "cat",
        "/secrets/token",
    )
    line = assert_fails(refused, ExitCode.AUTH, "cannot open layer 2")
    assert "above every tier granted to user:contractor" in line
    assert SECRET.decode() not in refused.stdout + refused.stderr
    with setup.plane.admin() as client:
        entries = [e for e in entries_since(client, start) if e["kind"] == "layerchain.key"]
    assert [(e["subject"], e["layer"], e["decision"]) for e in entries] == [
        ("user:contractor", 1, "allow"),
        ("user:contractor", 2, "deny"),
    ]


def test_the_contractor_mounts_tier_1_until_stopped(
    setup: Setup, stored: dict[str, object], tmp_path: Path
) -> None:
    target = tmp_path / "view"
    target.mkdir()
    env = {**os.environ, "TRUSTPLANE_SESSION": str(setup.contractor.session)}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trustplane",
            "store",
            "mount",
            str(stored["id"]),
            str(target),
            "--tier",
            "1",
            "--store",
            str(setup.store),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None
        ready = json.loads(holder.stdout.readline())
        assert ready == {"image": stored["name"], "tier": 1, "mountpoint": str(target)}
        assert (target / "app/run.sh").exists()
        assert not (target / "secrets").exists()
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=60) == 0, holder.stderr.read() if holder.stderr else ""
    finally:
        if holder.poll() is None:
            holder.kill()
    assert not any(target.iterdir()), "unmounted at the end"
    assert leftovers(os.fspath(setup.store) + "/") == []


def test_the_broker_never_hands_a_lower_tier_a_key_above_it(
    setup: Setup,
    stored: dict[str, object],
    admin_keys: ControlPlaneKeys,
    contractor_keys: ControlPlaneKeys,
) -> None:
    chain = ChainRef(setup.plane.url, str(LayerStore(setup.store).find(str(stored["id"])).chain_id))
    full = admin_keys.layer_keys(chain, 2)
    assert contractor_keys.layer_keys(chain, 1) == full[:2] == chain_below(full[1], 1)
    with pytest.raises(Forbidden, match="above every tier"):
        contractor_keys.layer_keys(chain, 2)
    # Nor may it make a chain whose top it could not have (an import it cannot finish).
    with pytest.raises(Forbidden, match="refuses layer 2 of"):
        contractor_keys.create_chain(setup.repository, "sha256:" + "1" * 64, 3)
    mine = contractor_keys.create_chain(setup.repository, "sha256:" + "1" * 64, 2)
    assert len(contractor_keys.layer_keys(mine, 1)) == 2
    contractor_keys.destroy_chain(mine)
    # The answer is wrapped to the asker's transport key: no one else opens it.
    answer = contractor_keys.client.layer_key(chain.id, 1, Transport.ephemeral().public_pem)
    text = answer.model_dump_json()
    assert base64.b64encode(full[1]).decode() not in text
    assert full[1].hex() not in text


def test_a_key_of_another_image_opens_nothing(
    setup: Setup, stored: dict[str, object], admin_keys: ControlPlaneKeys, app_image: str
) -> None:
    """Another image stored by the same operator; its keys, offered for ours, fail at QEMU."""
    other = setup.admin(
        "store",
        "import",
        f"docker-daemon:{app_image}",
        "--name",
        "other",
        "--size",
        "1G",
        "--store",
        str(setup.store),
        "--quiet",
        "--json",
    )
    assert other.returncode == 0, other.stderr
    store = LayerStore(setup.store)
    theirs = store.find("other")
    ours = store.find(str(stored["id"]))

    class OthersKeys:
        def layer_keys(self, chain: ChainRef, tier: int) -> list[bytes]:
            return admin_keys.layer_keys(theirs.chain, tier)

    for tier in (0, 2):
        with (
            pytest.raises(DecryptionKeyError, match="does not open its layers"),
            store.view(
                ours,
                tier,
                OthersKeys(),  # type: ignore[arg-type]
            ),
        ):
            pass
    assert leftovers(os.fspath(setup.store) + "/") == []
    removed = setup.admin("store", "rm", "other", "--store", str(setup.store))
    assert removed.returncode == 0, removed.stderr


def test_removal_destroys_the_keys_first_and_only_for_the_creator(
    setup: Setup, stored: dict[str, object], admin_keys: ControlPlaneKeys
) -> None:
    store_dir = str(setup.store)
    image_id = str(stored["id"])
    chain = ChainRef(setup.plane.url, LayerStore(setup.store).find(image_id).chain_id)
    refused = setup.contractor("store", "rm", image_id, "--store", store_dir)
    assert_fails(refused, ExitCode.AUTH, "only the creator or an admin may delete layer chain")
    assert len(list((setup.store / "qcow2" / "layers").iterdir())) == 3, "nothing removed"

    removed = setup.admin("store", "rm", image_id, "--store", store_dir, "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["chain"] == chain.id
    assert list((setup.store / "qcow2" / "layers").iterdir()) == []
    with pytest.raises(NotFoundError):
        admin_keys.layer_keys(chain, 0)
    gone = setup.admin("store", "run", image_id, "--store", store_dir, "--", "true")
    assert_fails(gone, ExitCode.NOT_FOUND, "no stored image")
