"""--protect-config: the public config stops leaking how secret layers were made.

Docker's history for `COPY secrets/ /secrets/` names the sha256 of what was
copied; the public config of a protected image must not contain it, yet
trustplane restores the byte-identical original, and skopeo's decryption
still yields an image Docker runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest
from conftest import APP_SECRET, KeyPair, run_skopeo
from oci_helpers import blob, config, manifest, manifest_bytes

from trustplane.crypto.keys import load_unwrap_key
from trustplane.images.decrypt import DecryptRequest, decrypt_image
from trustplane.images.encrypt import EncryptRequest, encrypt_image
from trustplane.images.recipients import parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.oci import reference


@pytest.fixture(scope="module")
def protected(
    app_layout: Path, keys: dict[str, KeyPair], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    layout = tmp_path_factory.mktemp("protected") / "enc"
    encrypt_image(
        EncryptRequest(
            source=reference.parse(f"oci:{app_layout}:v1"),
            destination=reference.parse(f"oci:{layout}:v1"),
            recipients=[
                parse_recipient(f"jwe:{keys['ec-p256'].public}"),
                parse_recipient(f"jwe:{keys['tier-low'].public}:tier=1"),
            ],
            selector=LayerSelector.parse(["path:/secrets/**"]),
            protect_config=True,
        )
    )
    return layout


def secret_history(layout: Path) -> str:
    entries = [h for h in config(layout, "v1")["history"] if not h.get("empty_layer")]
    return str(entries[2].get("created_by", ""))


def test_public_config_hides_the_history_of_encrypted_layers(
    protected: Path, app_layout: Path
) -> None:
    original = secret_history(app_layout)
    assert "COPY" in original
    assert "/secrets/" in original
    public = blob(protected, manifest(protected, "v1")["config"]["digest"])
    assert original.encode() not in public
    assert b"/secrets/" not in public
    assert (
        config(protected, "v1")["rootfs"] == config(app_layout, "v1")["rootfs"]
    )  # Docker still loads it
    plain_history = [
        h for h in config(protected, "v1")["history"] if "app" in h.get("created_by", "")
    ]
    assert plain_history, "history of plain layers stays public"


def test_trustplane_restores_the_byte_identical_original(
    protected: Path, app_layout: Path, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    decrypt_image(
        DecryptRequest(
            source=reference.parse(f"oci:{protected}:v1"),
            destination=reference.parse(f"oci:{tmp_path / 'dec'}:v1"),
            keys=[load_unwrap_key(keys["ec-p256"].private.read_bytes(), "k")],
        )
    )
    assert manifest_bytes(tmp_path / "dec", "v1") == manifest_bytes(app_layout, "v1")


def test_lower_tier_sees_its_own_layers_history_only(
    protected: Path, app_layout: Path, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    decrypt_image(
        DecryptRequest(
            source=reference.parse(f"oci:{protected}:v1"),
            destination=reference.parse(f"oci:{tmp_path / 'dec'}:v1"),
            keys=[load_unwrap_key(keys["tier-low"].private.read_bytes(), "k")],
        )
    )
    restored = config(tmp_path / "dec", "v1")
    assert len(restored["rootfs"]["diff_ids"]) == 2
    assert "/secrets/" not in json.dumps(restored)


def test_skopeo_decryption_still_runs_in_docker(
    protected: Path, keys: dict[str, KeyPair], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    # skopeo cannot decrypt straight into Docker (its v2s2 conversion refuses
    # the +encrypted media type), so, as a skopeo user would: decrypt, then load.
    decrypted = tmp_path / "dec"
    run_skopeo(
        "copy",
        "--decryption-key",
        str(keys["ec-p256"].private),
        f"oci:{protected}:v1",
        f"oci:{decrypted}:v1",
    )
    run_skopeo("copy", f"oci:{decrypted}:v1", "docker-daemon:trustplane/app:skopeo-protected")
    output = docker_client.containers.run(
        "trustplane/app:skopeo-protected", ["/bin/sh", "/app/run.sh"], remove=True
    ).decode()
    assert APP_SECRET.decode().strip() in output
