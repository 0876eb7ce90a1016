"""Tampered or malformed input: one clear error, nothing at the destination.

Each case alters an encrypted image the way an attacker with write access to
the registry or the layout could, then decrypts it. The decryption must fail
with the right error class and message, before any plaintext is published:
the destination layout does not exist afterwards, the registry has no
manifest for the tag, Docker has no image of that name.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from conftest import KeyPair
from oci_helpers import blob_path, copy_layout, manifest, manifest_bytes, tree, write_manifest

from trustplane.crypto import keywrap
from trustplane.crypto.keys import load_recipient_key, load_unwrap_key
from trustplane.crypto.layer_cipher import Keystream, PrivateOptions, PublicOptions, new_mac
from trustplane.embedded.registry import RunningRegistry
from trustplane.errors import ExitCode, IntegrityError, MalformedError, TrustplaneError
from trustplane.images.decrypt import DecryptRequest, decrypt_image
from trustplane.images.encrypt import EncryptRequest, encrypt_image
from trustplane.images.recipients import parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.oci import reference
from trustplane.oci.transport import Endpoint

JWE = "org.opencontainers.image.enc.keys.jwe"
PUBOPTS = "org.opencontainers.image.enc.pubopts"


@pytest.fixture(scope="module")
def encrypted(
    app_layout: Path, keys: dict[str, KeyPair], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    layout = tmp_path_factory.mktemp("tamper") / "enc"
    encrypt_image(
        EncryptRequest(
            source=reference.parse(f"oci:{app_layout}:v1"),
            destination=reference.parse(f"oci:{layout}:v1"),
            recipients=[parse_recipient(f"jwe:{keys['ec-p256'].public}")],
            selector=LayerSelector.parse(["1,2"]),
        )
    )
    return layout


def flip_blob_byte(layout: Path) -> None:
    layer = manifest(layout, "v1")["layers"][2]
    path = blob_path(layout, layer["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate_blob(layout: Path) -> None:
    layer = manifest(layout, "v1")["layers"][2]
    path = blob_path(layout, layer["digest"])
    path.write_bytes(path.read_bytes()[:-100])


def swap_hmac(layout: Path) -> None:
    doc = manifest(layout, "v1")
    annotations = doc["layers"][2]["annotations"]
    other = doc["layers"][1]["annotations"][PUBOPTS]
    annotations[PUBOPTS] = other  # a valid HMAC, of another layer
    write_manifest(layout, "v1", doc)


def alter_jwe(layout: Path) -> None:
    doc = manifest(layout, "v1")
    annotations = doc["layers"][2]["annotations"]
    jwe = json.loads(base64.b64decode(annotations[JWE]))
    ciphertext = jwe["ciphertext"]
    jwe["ciphertext"] = ("A" if ciphertext[0] != "A" else "B") + ciphertext[1:]
    annotations[JWE] = base64.b64encode(json.dumps(jwe).encode()).decode()
    write_manifest(layout, "v1", doc)


def rewrite_manifest_without_index(layout: Path) -> None:
    digest = json.loads((layout / "index.json").read_bytes())["manifests"][0]["digest"]
    path = blob_path(layout, digest)
    path.write_bytes(path.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":2 '))


def malformed_manifest(layout: Path) -> None:
    write_manifest(layout, "v1", b'{"schemaVersion":2,"layers":"not a list"}')


def forged_layer(layout: Path, keys: dict[str, KeyPair]) -> None:
    """A layer re-encrypted by someone with only the public key, whose private
    options claim the original digest for different plaintext."""
    doc = manifest(layout, "v1")
    layer = doc["layers"][2]
    symkey, nonce = os.urandom(32), os.urandom(16)
    plaintext = b"not the layer the digest names" * 100
    ciphertext = Keystream(symkey, nonce).update(plaintext)
    mac = new_mac(symkey)
    mac.update(ciphertext)
    claimed = PrivateOptions(symkey=symkey, nonce=nonce, digest=_original_digest(layout, keys))
    recipient = load_recipient_key(keys["ec-p256"].public.read_bytes(), "pub")
    import hashlib

    digest = "sha256:" + hashlib.sha256(ciphertext).hexdigest()
    blob_path(layout, digest).write_bytes(ciphertext)
    layer.update(
        digest=digest,
        size=len(ciphertext),
        annotations={
            JWE: base64.b64encode(keywrap.wrap(claimed.to_json(), [recipient]).encode()).decode(),
            PUBOPTS: base64.b64encode(PublicOptions(hmac=mac.digest()).to_json()).decode(),
        },
    )
    write_manifest(layout, "v1", doc)


def _original_digest(layout: Path, keys: dict[str, KeyPair]) -> str:
    from trustplane.images.decrypt import unwrap_layer
    from trustplane.oci.model import Descriptor

    layer = Descriptor.model_validate(manifest(layout, "v1")["layers"][2])
    opened = unwrap_layer(layer, [load_unwrap_key(keys["ec-p256"].private.read_bytes(), "k")], "t")
    assert opened is not None
    return opened.private.digest


CASES: dict[str, tuple[Callable[..., None], type[TrustplaneError], str]] = {
    "flipped ciphertext byte": (flip_blob_byte, IntegrityError, "HMAC mismatch"),
    "truncated blob": (truncate_blob, IntegrityError, "bytes where the manifest says"),
    "HMAC of another layer": (swap_hmac, IntegrityError, "HMAC mismatch"),
    "altered JWE": (alter_jwe, IntegrityError, "fails authentication"),
    "manifest changed behind the index": (
        rewrite_manifest_without_index,
        IntegrityError,
        "does not match its digest",
    ),
    "malformed manifest": (malformed_manifest, MalformedError, "invalid"),
    "forged layer with a false digest": (forged_layer, IntegrityError, "does not match its digest"),
}


def tamper(name: str, layout: Path, keys: dict[str, KeyPair]) -> None:
    action = CASES[name][0]
    if action is forged_layer:
        action(layout, keys)
    else:
        action(layout)


def decrypt(
    source: Path, destination: str, keys: dict[str, KeyPair], endpoint: Endpoint | None = None
) -> Any:
    return decrypt_image(
        DecryptRequest(
            source=reference.parse(f"oci:{source}:v1"),
            destination=reference.parse(destination),
            keys=[load_unwrap_key(keys["ec-p256"].private.read_bytes(), "ec-p256.pem")],
            destination_endpoint=endpoint or Endpoint(),
        )
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampering_is_refused_and_leaves_no_layout(
    case: str, encrypted: Path, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    layout = copy_layout(encrypted, tmp_path / "enc")
    tamper(case, layout, keys)
    _, error, message = CASES[case]
    existing = tmp_path / "existing"
    copy_layout(encrypted, existing)
    before = tree(existing)

    with pytest.raises(error, match=message):
        decrypt(layout, f"oci:{tmp_path / 'out'}:v1", keys)
    assert not (tmp_path / "out").exists()

    with pytest.raises(error, match=message):  # an existing layout is left exactly as it was
        decrypt(layout, f"oci:{existing}:other", keys)
    assert tree(existing) == before


@pytest.mark.parametrize("case", ["flipped ciphertext byte", "forged layer with a false digest"])
def test_tampering_leaves_no_image_in_the_registry(
    case: str,
    encrypted: Path,
    keys: dict[str, KeyPair],
    tmp_path: Path,
    registry_plain: RunningRegistry,
) -> None:
    layout = copy_layout(encrypted, tmp_path / "enc")
    tamper(case, layout, keys)
    target = f"docker://{registry_plain.host}/tamper/{case.replace(' ', '-')}:v1"
    with pytest.raises(IntegrityError):
        decrypt(layout, target, keys)
    response = httpx.get(f"{registry_plain.url}/v2/tamper/{case.replace(' ', '-')}/tags/list")
    assert response.status_code == 404  # the repository was never created: no blob, no manifest


def test_tampering_leaves_no_image_in_docker(
    encrypted: Path, keys: dict[str, KeyPair], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    layout = copy_layout(encrypted, tmp_path / "enc")
    flip_blob_byte(layout)
    with pytest.raises(IntegrityError):
        decrypt(layout, "docker-daemon:trustplane/tampered:v1", keys)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get("trustplane/tampered:v1")


def test_cli_reports_one_line_and_the_integrity_exit_code(
    encrypted: Path, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    layout = copy_layout(encrypted, tmp_path / "enc")
    flip_blob_byte(layout)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trustplane",
            "image",
            "decrypt",
            f"oci:{layout}:v1",
            f"oci:{tmp_path / 'out'}:v1",
            "--key",
            str(keys["ec-p256"].private),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == ExitCode.INTEGRITY
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trustplane: error: ")
    assert "HMAC mismatch" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_intact_copy_still_decrypts(
    encrypted: Path, keys: dict[str, KeyPair], app_layout: Path, tmp_path: Path
) -> None:
    """The control: the same steps without tampering succeed and match the original."""
    decrypt(encrypted, f"oci:{tmp_path / 'out'}:v1", keys)
    assert manifest_bytes(tmp_path / "out", "v1") == manifest_bytes(app_layout, "v1")
