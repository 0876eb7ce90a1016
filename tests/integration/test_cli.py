"""The command line's contract: one line per failure, the documented exit code.

Each documented code is produced here by a real failure of its kind, through
the installed entry point (`python -m trustplane`), as a user would meet it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KeyPair
from oci_helpers import copy_layout, manifest, write_manifest

from trustplane.embedded.process import free_port
from trustplane.embedded.registry import RunningRegistry
from trustplane.errors import ExitCode


def trustplane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustplane", *args], capture_output=True, text=True, timeout=300
    )


def assert_fails(result: subprocess.CompletedProcess[str], code: ExitCode, text: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trustplane: error: "), lines[0]
    assert text in lines[0]
    assert "Traceback" not in result.stderr


def test_encrypt_inspect_decrypt_with_json_output(
    app_layout: Path, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    enc = trustplane(
        "image",
        "encrypt",
        f"oci:{app_layout}:v1",
        f"oci:{tmp_path / 'enc'}:v1",
        "--recipient",
        f"jwe:{keys['rsa'].public}",
        "--layers",
        "path:/secrets/**",
        "--json",
    )
    assert enc.returncode == 0, enc.stderr
    assert json.loads(enc.stdout)["encryptedLayers"] == [2]

    kid = trustplane("key", "id", str(keys["rsa"].public)).stdout.strip()
    info = json.loads(
        trustplane(
            "image",
            "inspect",
            f"oci:{tmp_path / 'enc'}:v1",
            "--json",
            "--key",
            str(keys["rsa"].private),
        ).stdout
    )
    top = info["layers"][2]
    assert top["encrypted"]
    assert top["opensWithGivenKeys"]
    assert [r["keyID"] for r in top["recipients"]] == [kid]

    dec = trustplane(
        "image",
        "decrypt",
        f"oci:{tmp_path / 'enc'}:v1",
        f"oci:{tmp_path / 'dec'}:v1",
        "--key",
        str(keys["rsa"].private),
        "--json",
    )
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout)["decryptedLayers"] == [2]


def test_key_generate_writes_a_private_key_only_we_can_read(tmp_path: Path) -> None:
    result = trustplane("key", "generate", str(tmp_path / "alice"), "--type", "ec-p384")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "alice.pem").stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PRIVATE KEY" in (tmp_path / "alice.pem").read_bytes()  # PKCS#8, as skopeo needs
    again = trustplane("key", "generate", str(tmp_path / "alice"))
    assert_fails(again, ExitCode.USAGE, "exists")


def test_usage_errors(app_layout: Path, keys: dict[str, KeyPair], tmp_path: Path) -> None:
    assert_fails(
        trustplane(
            "image", "encrypt", "nowhere", f"oci:{tmp_path}/x", "-r", f"jwe:{keys['rsa'].public}"
        ),
        ExitCode.USAGE,
        "name a transport",
    )
    assert_fails(
        trustplane(
            "image",
            "encrypt",
            f"oci:{app_layout}:v1",
            f"oci:{tmp_path}/x",
            "-r",
            f"jwe:{keys['rsa'].public}",
            "--layers",
            "7",
        ),
        ExitCode.USAGE,
        "out of range",
    )
    missing_option = trustplane("image", "encrypt", f"oci:{app_layout}:v1", f"oci:{tmp_path}/x")
    assert missing_option.returncode == ExitCode.USAGE
    assert "Traceback" not in missing_option.stderr


def test_not_found(keys: dict[str, KeyPair], tmp_path: Path) -> None:
    assert_fails(
        trustplane("image", "inspect", f"oci:{tmp_path / 'absent'}:v1"),
        ExitCode.NOT_FOUND,
        "not an OCI image layout",
    )
    assert_fails(
        trustplane("image", "decrypt", "oci:/x:v1", "oci:/y:v1", "--key", str(tmp_path / "no.pem")),
        ExitCode.NOT_FOUND,
        "does not exist",
    )


def test_auth_refused(
    registry_tls: RunningRegistry, keys: dict[str, KeyPair], app_layout: Path
) -> None:
    assert registry_tls.ca_file is not None
    result = trustplane(
        "image",
        "encrypt",
        f"oci:{app_layout}:v1",
        f"docker://{registry_tls.host}/cli/app:1",
        "-r",
        f"jwe:{keys['rsa'].public}",
        "--dest-cacert",
        str(registry_tls.ca_file),
        "--dest-creds",
        f"{registry_tls.username}:wrong-password",
    )
    assert_fails(result, ExitCode.AUTH, "HTTP 401")


def test_no_key_when_everything_is_required(
    app_layout: Path, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    trustplane(
        "image",
        "encrypt",
        f"oci:{app_layout}:v1",
        f"oci:{tmp_path / 'enc'}:v1",
        "-r",
        f"jwe:{keys['rsa'].public}",
    )
    result = trustplane(
        "image",
        "decrypt",
        f"oci:{tmp_path / 'enc'}:v1",
        f"oci:{tmp_path / 'dec'}:v1",
        "--key",
        str(keys["outsider"].private),
        "--no-truncate",
    )
    assert_fails(result, ExitCode.NO_KEY, "none of the given keys can open layer 0")
    assert not (tmp_path / "dec").exists()


def test_malformed_manifest(app_layout: Path, tmp_path: Path) -> None:
    layout = copy_layout(app_layout, tmp_path / "bad")
    doc = manifest(layout, "v1")
    doc["layers"][0]["digest"] = "sha256:not-a-digest"
    write_manifest(layout, "v1", doc)
    assert_fails(
        trustplane("image", "inspect", f"oci:{layout}:v1"),
        ExitCode.MALFORMED,
        "invalid layers.0.digest",
    )


def test_unavailable_registry() -> None:
    result = trustplane("image", "inspect", f"docker://127.0.0.1:{free_port()}/nothing/here:1")
    assert_fails(result, ExitCode.UNAVAILABLE, "unreachable")


def test_docker_cannot_hold_encrypted_layers(
    app_layout: Path, keys: dict[str, KeyPair], docker_daemon: object
) -> None:
    result = trustplane(
        "image",
        "encrypt",
        f"oci:{app_layout}:v1",
        "docker-daemon:trustplane/never:1",
        "-r",
        f"jwe:{keys['rsa'].public}",
    )
    assert_fails(result, ExitCode.UNSUPPORTED, "Docker cannot store encrypted layers")


@pytest.mark.parametrize("bits", [1024])
def test_weak_rsa_recipient_is_refused(bits: int, app_layout: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    (tmp_path / "weak.pub").write_bytes(
        weak.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    result = trustplane(
        "image",
        "encrypt",
        f"oci:{app_layout}:v1",
        f"oci:{tmp_path / 'x'}:v1",
        "-r",
        f"jwe:{tmp_path / 'weak.pub'}",
    )
    assert_fails(result, ExitCode.UNSUPPORTED, "at least 2048")
