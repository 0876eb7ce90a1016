"""trustplane and skopeo 1.9.3 read each other's encrypted images, byte for byte.

The reference original is the app image as skopeo writes it to an OCI layout.
Each round trip must give back the original manifest, byte-identical (so the
same digest), whichever tool encrypted and whichever decrypted.
"""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest
from conftest import APP_SECRET, KeyPair, run_skopeo
from oci_helpers import config, index_entry, manifest, manifest_bytes, write_manifest

from trustplane.crypto.keys import load_unwrap_key
from trustplane.images.copy import CopyRequest, copy_image
from trustplane.images.decrypt import DecryptRequest, decrypt_image
from trustplane.images.encrypt import EncryptRequest, encrypt_image
from trustplane.images.recipients import parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.oci import reference

ENC = "+encrypted"


def tp_encrypt(
    source: Path, target: Path, recipients: list[str], layers: list[str] | None = None
) -> None:
    encrypt_image(
        EncryptRequest(
            source=reference.parse(f"oci:{source}:v1"),
            destination=reference.parse(f"oci:{target}:v1"),
            recipients=[parse_recipient(spec) for spec in recipients],
            selector=LayerSelector.parse(layers or []),
        )
    )


def tp_decrypt(source: Path, target: Path, *keys: KeyPair) -> None:
    decrypt_image(
        DecryptRequest(
            source=reference.parse(f"oci:{source}:v1"),
            destination=reference.parse(f"oci:{target}:v1"),
            keys=[load_unwrap_key(k.private.read_bytes(), str(k.private)) for k in keys],
        )
    )


@pytest.mark.parametrize("kind", ["rsa", "ec-p256", "ec-p384", "ec-p521"])
def test_skopeo_decrypts_what_trustplane_encrypts(
    kind: str, keys: dict[str, KeyPair], app_layout: Path, tmp_path: Path
) -> None:
    key = keys[kind]
    tp_encrypt(app_layout, tmp_path / "enc", [f"jwe:{key.public}"])
    encrypted = manifest(tmp_path / "enc", "v1")
    assert all(layer["mediaType"].endswith(ENC) for layer in encrypted["layers"])

    run_skopeo(
        "copy",
        "--decryption-key",
        str(key.private),
        f"oci:{tmp_path / 'enc'}:v1",
        f"oci:{tmp_path / 'dec'}:v1",
    )

    assert manifest_bytes(tmp_path / "dec", "v1") == manifest_bytes(app_layout, "v1")


def test_several_recipients_each_decrypt_with_skopeo(
    keys: dict[str, KeyPair], app_layout: Path, tmp_path: Path
) -> None:
    recipients = [keys["rsa"], keys["ec-p384"], keys["ec-p521"]]
    tp_encrypt(app_layout, tmp_path / "enc", [f"jwe:{k.public}" for k in recipients])
    annotation = manifest(tmp_path / "enc", "v1")["layers"][0]["annotations"]
    jwe = json.loads(
        __import__("base64").b64decode(annotation["org.opencontainers.image.enc.keys.jwe"])
    )
    assert len(jwe["recipients"]) == 3  # the general JSON form, one entry per key

    for key in recipients:
        out = tmp_path / f"dec-{key.kind}"
        run_skopeo(
            "copy",
            "--decryption-key",
            str(key.private),
            f"oci:{tmp_path / 'enc'}:v1",
            f"oci:{out}:v1",
        )
        assert manifest_bytes(out, "v1") == manifest_bytes(app_layout, "v1")

    refused = run_skopeo(
        "copy",
        "--decryption-key",
        str(keys["outsider"].private),
        f"oci:{tmp_path / 'enc'}:v1",
        f"oci:{tmp_path / 'nope'}:v1",
        check=False,
    )
    assert refused.returncode != 0


def test_top_layer_only(keys: dict[str, KeyPair], app_layout: Path, tmp_path: Path) -> None:
    tp_encrypt(app_layout, tmp_path / "enc", [f"jwe:{keys['ec-p256'].public}"], ["-1"])
    original = manifest(app_layout, "v1")["layers"]
    layers = manifest(tmp_path / "enc", "v1")["layers"]
    assert [layer["mediaType"].endswith(ENC) for layer in layers] == [False] * (len(layers) - 1) + [
        True
    ]
    assert (
        layers[:-1] == original[:-1]
    )  # plain layers keep their digest: still shared with the base

    run_skopeo(
        "copy",
        "--decryption-key",
        str(keys["ec-p256"].private),
        f"oci:{tmp_path / 'enc'}:v1",
        f"oci:{tmp_path / 'dec'}:v1",
    )
    assert manifest_bytes(tmp_path / "dec", "v1") == manifest_bytes(app_layout, "v1")


def test_path_selection_encrypts_exactly_the_secret_layer(
    keys: dict[str, KeyPair], app_layout: Path, tmp_path: Path
) -> None:
    tp_encrypt(app_layout, tmp_path / "enc", [f"jwe:{keys['rsa'].public}"], ["path:/secrets/**"])
    layers = manifest(tmp_path / "enc", "v1")["layers"]
    assert [layer["mediaType"].endswith(ENC) for layer in layers] == [False, False, True]

    run_skopeo(
        "copy",
        "--decryption-key",
        str(keys["rsa"].private),
        f"oci:{tmp_path / 'enc'}:v1",
        f"oci:{tmp_path / 'dec'}:v1",
    )
    assert manifest_bytes(tmp_path / "dec", "v1") == manifest_bytes(app_layout, "v1")


@pytest.mark.parametrize("kind", ["rsa", "ec-p256", "ec-p521"])
def test_trustplane_decrypts_what_skopeo_encrypts(
    kind: str, keys: dict[str, KeyPair], app_layout: Path, tmp_path: Path
) -> None:
    key = keys[kind]
    run_skopeo(
        "copy",
        "--encryption-key",
        f"jwe:{key.public}",
        f"oci:{app_layout}:v1",
        f"oci:{tmp_path / 'enc'}:v1",
    )
    assert all(
        layer["mediaType"].endswith(ENC) for layer in manifest(tmp_path / "enc", "v1")["layers"]
    )

    tp_decrypt(tmp_path / "enc", tmp_path / "dec", key)

    assert manifest_bytes(tmp_path / "dec", "v1") == manifest_bytes(app_layout, "v1")
    assert index_entry(tmp_path / "dec", "v1")["digest"] == index_entry(app_layout, "v1")["digest"]


def test_trustplane_decrypts_skopeo_multi_recipient_and_partial(
    keys: dict[str, KeyPair], app_layout: Path, tmp_path: Path
) -> None:
    run_skopeo(
        "copy",
        "--encryption-key",
        f"jwe:{keys['rsa'].public}",
        "--encryption-key",
        f"jwe:{keys['ec-p384'].public}",
        "--encrypt-layer",
        "-1",
        f"oci:{app_layout}:v1",
        f"oci:{tmp_path / 'enc'}:v1",
    )
    tp_decrypt(tmp_path / "enc", tmp_path / "dec", keys["ec-p384"])
    assert manifest_bytes(tmp_path / "dec", "v1") == manifest_bytes(app_layout, "v1")


def test_round_trip_through_trustplane_alone(
    keys: dict[str, KeyPair], app_layout: Path, tmp_path: Path
) -> None:
    tp_encrypt(app_layout, tmp_path / "enc", [f"jwe:{keys['ec-p256'].public}"], ["1,2"])
    tp_decrypt(tmp_path / "enc", tmp_path / "dec", keys["ec-p256"])
    assert manifest_bytes(tmp_path / "dec", "v1") == manifest_bytes(app_layout, "v1")
    assert config(tmp_path / "dec", "v1") == config(app_layout, "v1")


def test_tiered_jwe_names_exactly_the_reaching_recipients_for_skopeo(
    keys: dict[str, KeyPair], app_layout: Path, tmp_path: Path
) -> None:
    """skopeo with a tier-1 key opens layers 0..1 and nothing above."""
    tp_encrypt(
        app_layout,
        tmp_path / "enc",
        [f"jwe:{keys['ec-p256'].public}", f"jwe:{keys['tier-low'].public}:tier=1"],
    )
    full = manifest(tmp_path / "enc", "v1")
    for top in range(len(full["layers"])):
        # An image made of layers 0..top, as a registry could serve it.
        cut = {**full, "layers": full["layers"][: top + 1]}
        write_manifest(tmp_path / "enc", "v1", cut)
        result = run_skopeo(
            "copy",
            "--decryption-key",
            str(keys["tier-low"].private),
            f"oci:{tmp_path / 'enc'}:v1",
            f"oci:{tmp_path / f'dec-{top}'}:v1",
            check=False,
        )
        assert (result.returncode == 0) == (top <= 1), result.stderr


def test_trustplane_decrypts_layers_skopeo_compressed_while_encrypting(
    app_image: str, keys: dict[str, KeyPair], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """skopeo gzips uncompressed layers as it encrypts them but records the
    digest of the uncompressed original; trustplane accepts such a layer only
    because its decompressed content matches that digest."""
    plain = tmp_path / "plain"
    copy_image(
        CopyRequest(
            reference.parse(f"docker-daemon:{app_image}"), reference.parse(f"oci:{plain}:v1")
        )
    )
    assert all(layer["mediaType"].endswith(".tar") for layer in manifest(plain, "v1")["layers"])
    run_skopeo(
        "copy",
        "--encryption-key",
        f"jwe:{keys['rsa'].public}",
        f"oci:{plain}:v1",
        f"oci:{tmp_path / 'enc'}:v1",
    )
    assert all(
        layer["mediaType"].endswith("tar+gzip+encrypted")
        for layer in manifest(tmp_path / "enc", "v1")["layers"]
    )

    decrypt_image(
        DecryptRequest(
            source=reference.parse(f"oci:{tmp_path / 'enc'}:v1"),
            destination=reference.parse("docker-daemon:trustplane/app:skopeo-gzip"),
            keys=[load_unwrap_key(keys["rsa"].private.read_bytes(), "rsa")],
        )
    )
    output = docker_client.containers.run(
        "trustplane/app:skopeo-gzip", ["cat", "/secrets/token"], remove=True
    )
    assert output == APP_SECRET
