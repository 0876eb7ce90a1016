"""Image signatures against the real cosign 2.x and a real registry, both ways.

cosign verifies what trustplane signs, trustplane verifies what cosign signs,
and each reads the other's encrypted private keys; a tampered signature, a
wrong key, a signature moved to another image and an unsigned image each
fail with one clear line and exit code 5. With a control plane, signatures
go to the transparency log and `verify --require-log` proves inclusion.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import run_skopeo
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.registry import RunningRegistry
from trustplane.errors import ExitCode

PASSWORD = "correct horse battery staple"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE = "dev.cosignproject.cosign/signature"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def trustplane(
    *args: str, env: dict[str, str] | None = None, password: str | None = PASSWORD
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    environment.pop("TRUSTPLANE_DEBUG", None)
    environment.pop("COSIGN_PASSWORD", None)
    if password is not None:
        environment["COSIGN_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-m", "trustplane", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        stdin=subprocess.DEVNULL,
    )


def run_cosign(
    cosign: str, *args: str, password: str = PASSWORD, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COSIGN_PASSWORD": password}
    result = subprocess.run([cosign, *args], capture_output=True, text=True, timeout=300, env=env)
    if check and result.returncode != 0:
        pytest.fail(f"cosign {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def cosign_sign(cosign: str, key: Path, image: str) -> None:
    run_cosign(
        cosign,
        "sign",
        "--key",
        str(key),
        "--tlog-upload=false",
        "--allow-http-registry",
        "--allow-insecure-registry",
        "--yes",
        image,
    )


def cosign_verify(cosign: str, key: Path, image: str) -> subprocess.CompletedProcess[str]:
    return run_cosign(
        cosign,
        "verify",
        "--key",
        str(key),
        "--insecure-ignore-tlog=true",
        "--allow-http-registry",
        "--allow-insecure-registry",
        image,
        check=False,
    )


def assert_fails(result: subprocess.CompletedProcess[str], code: int, text: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trustplane: error: "), lines[0]
    assert text in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


class Image:
    """The app image pushed to its own repository of the plain registry."""

    def __init__(self, registry: RunningRegistry, layout: Path, repository: str) -> None:
        self.registry = registry
        self.repository = repository
        self.ref = f"{registry.host}/{repository}:v1"
        run_skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{self.ref}")
        self.manifest = self.get(f"/v2/{repository}/manifests/v1").content
        self.digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()
        self.pinned = f"{registry.host}/{repository}@{self.digest}"
        self.docker_ref = f"docker://{self.ref}"

    @property
    def sig_tag(self) -> str:
        return "sha256-" + self.digest.removeprefix("sha256:") + ".sig"

    def get(self, path: str) -> httpx.Response:
        response = httpx.get(
            self.registry.url + path,
            headers={"Accept": OCI_MANIFEST},
            timeout=30,
        )
        response.raise_for_status()
        return response

    def signature_manifest(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/v2/{self.repository}/manifests/{self.sig_tag}").json()
        return result

    def put_manifest(self, tag: str, document: dict[str, Any] | bytes) -> str:
        raw = document if isinstance(document, bytes) else json.dumps(document).encode()
        response = httpx.put(
            f"{self.registry.url}/v2/{self.repository}/manifests/{tag}",
            content=raw,
            headers={"Content-Type": OCI_MANIFEST},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def payloads(self) -> list[bytes]:
        return [
            self.get(f"/v2/{self.repository}/blobs/{layer['digest']}").content
            for layer in self.signature_manifest()["layers"]
        ]


@pytest.fixture
def image(
    request: pytest.FixtureRequest, registry_plain: RunningRegistry, app_layout: Path
) -> Image:
    name = request.node.name.lower().replace("[", "-").replace("]", "").replace("_", "-")
    return Image(registry_plain, app_layout, f"sig/{name}"[:120])


def generate(prefix: Path, key_type: str) -> tuple[Path, Path]:
    result = trustplane("key", "generate", "--signing", "--out", str(prefix), "--type", key_type)
    assert result.returncode == 0, result.stderr
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----" in private.read_bytes()
    return private, public


def cosign_key_pair(cosign: str, directory: Path, key_type: str) -> tuple[Path, Path]:
    """cosign's own key: generate-key-pair (ECDSA P-256), or an imported PEM key.

    cosign 2.5's import-key-pair refuses every RSA key ("error validating rsa
    key: unsupported public key type", PKCS#1 or PKCS#8, 2048 to 4096 bits),
    so for RSA the key is trustplane's, which cosign loads and signs with.
    """
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "cosign"
    if key_type == "rsa":
        return generate(prefix, "rsa")
    if key_type == "ecdsa-p256":
        result = subprocess.run(
            [cosign, "generate-key-pair", "--output-key-prefix", str(prefix)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COSIGN_PASSWORD": PASSWORD},
            cwd=directory,
        )
        assert result.returncode == 0, result.stderr
    else:
        private = ed25519.Ed25519PrivateKey.generate()
        pem = directory / "plain.pem"
        pem.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        run_cosign(cosign, "import-key-pair", "--key", str(pem), "--output-key-prefix", str(prefix))
    return directory / "cosign.key", directory / "cosign.pub"


KEY_TYPES = ["ecdsa-p256", "ed25519", "rsa"]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_cosign_verifies_what_trustplane_signs(
    key_type: str, image: Image, cosign: str, tmp_path: Path
) -> None:
    private, public = generate(tmp_path / "tp", key_type)
    signed = trustplane("image", "sign", image.docker_ref, "--key", str(private), "--json")
    assert signed.returncode == 0, signed.stderr
    answer = json.loads(signed.stdout)
    assert answer["manifestDigest"] == image.digest
    assert answer["signatureTag"] == image.sig_tag

    verified = cosign_verify(cosign, public, image.ref)
    assert verified.returncode == 0, verified.stderr
    [claim] = json.loads(verified.stdout)
    assert claim["critical"]["image"]["docker-manifest-digest"] == image.digest
    assert (
        claim["critical"]["identity"]["docker-reference"]
        == f"{image.registry.host}/{image.repository}"
    )
    assert claim["critical"]["type"] == "cosign container image signature"

    # And trustplane agrees with itself, by tag and by digest.
    for ref in (image.docker_ref, f"docker://{image.pinned}"):
        ok = trustplane("image", "verify", ref, "--key", str(public))
        assert ok.returncode == 0, ok.stderr
        assert "1 valid signature(s)" in ok.stdout


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_trustplane_verifies_what_cosign_signs(
    key_type: str, image: Image, cosign: str, tmp_path: Path
) -> None:
    private, public = cosign_key_pair(cosign, tmp_path / "cosign", key_type)
    cosign_sign(cosign, private, image.pinned)
    result = trustplane("image", "verify", image.docker_ref, "--key", str(public), "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["manifestDigest"] == image.digest
    assert len(answer["signatures"]) == 1
    # cosign's payload is byte for byte the one trustplane would write.
    from trustplane.images.sign import simple_signing_payload

    [payload] = image.payloads()
    assert payload == simple_signing_payload(
        f"{image.registry.host}/{image.repository}", image.digest
    )


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_each_reads_the_others_encrypted_private_key(
    key_type: str, image: Image, cosign: str, tmp_path: Path
) -> None:
    """cosign signs with trustplane's key; trustplane signs with cosign's."""
    tp_private, tp_public = generate(tmp_path / "tp", key_type)
    co_private, co_public = cosign_key_pair(cosign, tmp_path / "cosign", key_type)
    cosign_sign(cosign, tp_private, image.pinned)
    signed = trustplane("image", "sign", image.docker_ref, "--key", str(co_private))
    assert signed.returncode == 0, signed.stderr

    # Both signatures sit in one .sig manifest, appended as cosign appends.
    layers = image.signature_manifest()["layers"]
    assert [layer["mediaType"] for layer in layers] == [SIMPLE_SIGNING] * 2
    for public in (tp_public, co_public):
        assert cosign_verify(cosign, public, image.ref).returncode == 0
        ok = trustplane("image", "verify", image.docker_ref, "--key", str(public))
        assert ok.returncode == 0, ok.stderr


def test_signing_again_appends_once_and_keeps_cosigns_signature(
    image: Image, cosign: str, tmp_path: Path
) -> None:
    co_private, co_public = cosign_key_pair(cosign, tmp_path / "cosign", "ecdsa-p256")
    tp_private, tp_public = generate(tmp_path / "tp", "ed25519")
    cosign_sign(cosign, co_private, image.pinned)
    before = image.signature_manifest()["layers"][0]
    for _ in range(2):  # Ed25519 is deterministic: the second run finds its signature there
        assert (
            trustplane("image", "sign", image.docker_ref, "--key", str(tp_private)).returncode == 0
        )
    layers = image.signature_manifest()["layers"]
    assert len(layers) == 2
    assert layers[0] == before
    # The config lists every payload, as go-containerregistry's does.
    config_digest = image.signature_manifest()["config"]["digest"]
    config = image.get(f"/v2/{image.repository}/blobs/{config_digest}").json()
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in layers]
    assert cosign_verify(cosign, co_public, image.ref).returncode == 0
    assert cosign_verify(cosign, tp_public, image.ref).returncode == 0


def test_a_tampered_signature_is_refused_by_both(image: Image, cosign: str, tmp_path: Path) -> None:
    private, public = generate(tmp_path / "tp", "ecdsa-p256")
    assert trustplane("image", "sign", image.docker_ref, "--key", str(private)).returncode == 0
    document = image.signature_manifest()
    # A valid signature, but over other bytes: the one another key would make is as good.
    forged = base64.b64decode(document["layers"][0]["annotations"][SIGNATURE])
    forged = forged[:-1] + bytes([forged[-1] ^ 0x01])
    document["layers"][0]["annotations"][SIGNATURE] = base64.b64encode(forged).decode()
    image.put_manifest(image.sig_tag, document)
    result = trustplane("image", "verify", image.docker_ref, "--key", str(public))
    assert_fails(result, ExitCode.INTEGRITY, "does not verify with")
    assert cosign_verify(cosign, public, image.ref).returncode != 0


def test_a_tampered_payload_is_refused(image: Image, tmp_path: Path) -> None:
    private, public = generate(tmp_path / "tp", "ecdsa-p256")
    assert trustplane("image", "sign", image.docker_ref, "--key", str(private)).returncode == 0
    document = image.signature_manifest()
    signed = image.payloads()[0]
    # Upload a changed payload and point the layer at it, keeping the signature.
    changed = signed.replace(b'"optional":null', b'"optional":{"x":"y"}')
    digest = "sha256:" + hashlib.sha256(changed).hexdigest()
    start = httpx.post(f"{image.registry.url}/v2/{image.repository}/blobs/uploads/", timeout=30)
    location = httpx.URL(image.registry.url).join(start.headers["Location"])
    put = httpx.put(location.copy_merge_params({"digest": digest}), content=changed, timeout=30)
    assert put.status_code == 201, put.text
    document["layers"][0]["digest"], document["layers"][0]["size"] = digest, len(changed)
    image.put_manifest(image.sig_tag, document)
    result = trustplane("image", "verify", image.docker_ref, "--key", str(public))
    assert_fails(result, ExitCode.INTEGRITY, "does not verify with")


def test_the_wrong_key_is_refused(image: Image, cosign: str, tmp_path: Path) -> None:
    private, _ = generate(tmp_path / "signer", "ecdsa-p256")
    _, stranger = generate(tmp_path / "stranger", "ecdsa-p256")
    assert trustplane("image", "sign", image.docker_ref, "--key", str(private)).returncode == 0
    result = trustplane("image", "verify", image.docker_ref, "--key", str(stranger))
    line = assert_fails(result, ExitCode.INTEGRITY, "no valid signature by")
    assert "does not verify with" in line
    assert cosign_verify(cosign, stranger, image.ref).returncode != 0


def test_a_signature_moved_to_another_image_is_refused(image: Image, tmp_path: Path) -> None:
    private, public = generate(tmp_path / "tp", "ecdsa-p256")
    assert trustplane("image", "sign", image.docker_ref, "--key", str(private)).returncode == 0
    # Another manifest in the same repository (one annotation more: another digest),
    # given the first image's signatures: valid signatures, for the other digest.
    other = json.loads(image.manifest)
    other["annotations"] = {"org.opencontainers.image.title": "impostor"}
    other_digest = image.put_manifest("impostor", other)
    sig = image.get(f"/v2/{image.repository}/manifests/{image.sig_tag}").content
    image.put_manifest("sha256-" + other_digest.removeprefix("sha256:") + ".sig", sig)
    result = trustplane(
        "image", "verify", f"docker://{image.registry.host}/{image.repository}:impostor",
        "--key", str(public),
    )  # fmt: skip
    line = assert_fails(result, ExitCode.INTEGRITY, "is for another image")
    assert image.digest in line


def test_a_signature_for_another_repository_is_refused(
    image: Image, registry_plain: RunningRegistry, app_layout: Path, tmp_path: Path
) -> None:
    private, public = generate(tmp_path / "tp", "ecdsa-p256")
    assert trustplane("image", "sign", image.docker_ref, "--key", str(private)).returncode == 0
    copy = Image(registry_plain, app_layout, image.repository + "-copy")
    assert copy.digest == image.digest
    run_skopeo(
        "copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--preserve-digests",
        f"docker://{image.registry.host}/{image.repository}:{image.sig_tag}",
        f"docker://{copy.registry.host}/{copy.repository}:{copy.sig_tag}",
    )  # fmt: skip
    result = trustplane("image", "verify", copy.docker_ref, "--key", str(public))
    assert_fails(result, ExitCode.INTEGRITY, "(docker-reference)")


def test_an_unsigned_image_and_a_wrong_password_are_clear_errors(
    image: Image, tmp_path: Path
) -> None:
    private, public = generate(tmp_path / "tp", "ecdsa-p256")
    result = trustplane("image", "verify", image.docker_ref, "--key", str(public))
    assert_fails(result, ExitCode.INTEGRITY, "is not signed")
    wrong = trustplane("image", "sign", image.docker_ref, "--key", str(private), password="nope")
    assert_fails(wrong, ExitCode.NO_KEY, "wrong password")
    none = trustplane("image", "sign", image.docker_ref, "--key", str(private), password=None)
    assert_fails(none, ExitCode.USAGE, "COSIGN_PASSWORD")
    missing = trustplane(
        "image", "sign", f"docker://{image.registry.host}/sig/nothing:v1", "--key", str(private)
    )
    assert_fails(missing, ExitCode.NOT_FOUND, "sig/nothing")


def test_signatures_go_to_the_transparency_log_and_verify_proves_inclusion(
    image: Image, control_plane: RunningControlPlane, cosign: str, tmp_path: Path
) -> None:
    env = {
        "TRUSTPLANE_SESSION": str(tmp_path / "session.json"),
        "TRUSTPLANE_LOG_STATE": str(tmp_path / "log-state.json"),
    }
    login = subprocess.run(
        [
            sys.executable, "-m", "trustplane", "login", "--server", control_plane.url,
            "--ca", str(control_plane.ca_file), "--user", "admin", "--password-stdin",
        ],
        input=control_plane.admin_password + "\n",
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    private, public = generate(tmp_path / "tp", "ecdsa-p256")

    # Signed without the log: --require-log has nothing to prove.
    plain = trustplane("image", "sign", image.docker_ref, "--key", str(private), env=env)
    assert plain.returncode == 0, plain.stderr
    unlogged = trustplane(
        "image", "verify", image.docker_ref, "--key", str(public), "--require-log", env=env
    )
    assert_fails(unlogged, ExitCode.INTEGRITY, "names a transparency log entry")

    # Signed with the log (a second key, so a second signature).
    private2, public2 = generate(tmp_path / "tp2", "ed25519")
    signed = trustplane(
        "image", "sign", image.docker_ref, "--key", str(private2), "--log", "--json", env=env
    )
    assert signed.returncode == 0, signed.stderr
    index = json.loads(signed.stdout)["logIndex"]
    assert isinstance(index, int)
    with control_plane.admin() as admin:
        entry = json.loads(admin.log_entry(index))
    assert entry["kind"] == "signature"
    assert entry["manifest"] == image.digest
    assert entry["image"] == f"{image.registry.host}/{image.repository}"
    assert entry["key_id"].startswith("sha256:")
    # cosign ignores the log-index annotation trustplane adds.
    assert cosign_verify(cosign, public2, image.ref).returncode == 0

    proven = trustplane(
        "image", "verify", image.docker_ref, "--key", str(public2), "--require-log", "--json",
        env=env,
    )  # fmt: skip
    assert proven.returncode == 0, proven.stderr
    assert json.loads(proven.stdout)["logIncluded"] == [index]

    # A log index that points at another entry is caught: the entry is included,
    # but it does not record this signature.
    with control_plane.admin() as admin:
        elsewhere = admin.authorize("image.pull", f"image:{image.repository}").log_index
    document = image.signature_manifest()
    for layer in document["layers"]:
        if "dev.trustplane.log.index" in layer.get("annotations", {}):
            layer["annotations"]["dev.trustplane.log.index"] = str(elsewhere)
    image.put_manifest(image.sig_tag, document)
    moved = trustplane(
        "image", "verify", image.docker_ref, "--key", str(public2), "--require-log", env=env
    )
    assert_fails(moved, ExitCode.INTEGRITY, "does not record this signature")


def test_the_control_plane_refuses_to_log_a_signature_that_does_not_verify(
    image: Image, control_plane: RunningControlPlane
) -> None:
    from trustplane.crypto.signing import generate_signing_key
    from trustplane.errors import IntegrityError
    from trustplane.images.sign import simple_signing_payload

    key = generate_signing_key("ecdsa-p256")
    payload = simple_signing_payload(image.repository, image.digest)
    with control_plane.admin() as admin:
        with pytest.raises(IntegrityError, match="does not verify"):
            admin.record_signature(
                image.repository, image.digest, payload, key.sign(payload + b"x"),
                key.public.public_pem(),
            )  # fmt: skip
        other = "sha256:" + "0" * 64
        with pytest.raises(IntegrityError, match="signs"):
            admin.record_signature(
                image.repository, other, payload, key.sign(payload), key.public.public_pem()
            )


def test_both_ways_over_tls_with_a_login(
    registry_tls: RunningRegistry, app_layout: Path, cosign: str, tmp_path: Path
) -> None:
    assert registry_tls.ca_file is not None
    assert registry_tls.username is not None
    assert registry_tls.password is not None
    creds = f"{registry_tls.username}:{registry_tls.password}"
    ref = f"{registry_tls.host}/sig/tls:v1"
    copied = trustplane(
        "image", "copy", "-q", f"oci:{app_layout}:v1", f"docker://{ref}",
        "--dest-cacert", str(registry_tls.ca_file), "--dest-creds", creds,
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    access = ("--cacert", str(registry_tls.ca_file), "--creds", creds)
    cosign_access = (
        f"--registry-cacert={registry_tls.ca_file}",
        f"--registry-username={registry_tls.username}",
        f"--registry-password={registry_tls.password}",
    )
    tp_private, tp_public = generate(tmp_path / "tp", "ecdsa-p256")
    co_private, co_public = cosign_key_pair(cosign, tmp_path / "cosign", "ed25519")

    signed = trustplane("image", "sign", f"docker://{ref}", "--key", str(tp_private), *access)
    assert signed.returncode == 0, signed.stderr
    run_cosign(cosign, "sign", "--key", str(co_private), "--tlog-upload=false", "--yes",
               *cosign_access, ref)  # fmt: skip
    for public in (tp_public, co_public):
        by_cosign = run_cosign(
            cosign, "verify", "--key", str(public), "--insecure-ignore-tlog=true",
            *cosign_access, ref, check=False,
        )  # fmt: skip
        assert by_cosign.returncode == 0, by_cosign.stderr
        ours = trustplane("image", "verify", f"docker://{ref}", "--key", str(public), *access)
        assert ours.returncode == 0, ours.stderr
    refused = trustplane("image", "verify", f"docker://{ref}", "--key", str(tp_public))
    assert refused.returncode in (ExitCode.AUTH, ExitCode.UNAVAILABLE), refused.stderr


def test_key_generate_for_signing(tmp_path: Path) -> None:
    from trustplane.crypto.signing import decrypt_private_key, load_verify_key

    implied = trustplane("key", "generate", "--out", str(tmp_path / "ed"), "--type", "ed25519")
    assert implied.returncode == 0, implied.stderr
    opened = decrypt_private_key((tmp_path / "ed.key").read_bytes(), PASSWORD.encode(), "ed.key")
    assert opened.public.key_type == "ed25519"
    assert (
        load_verify_key((tmp_path / "ed.pub").read_bytes(), "ed.pub").key_id == opened.public.key_id
    )

    default = trustplane("key", "generate", "--signing", str(tmp_path / "ec"), password="")
    assert default.returncode == 0, default.stderr
    ec_key = decrypt_private_key((tmp_path / "ec.key").read_bytes(), b"", "ec.key")
    assert ec_key.public.key_type == "ecdsa-p256"  # cosign's default, and an empty password

    again = trustplane("key", "generate", "--signing", "--out", str(tmp_path / "ec"))
    assert_fails(again, ExitCode.USAGE, "exists")
    wrong_type = trustplane(
        "key", "generate", "--signing", str(tmp_path / "x"), "--type", "ec-p384"
    )
    assert_fails(wrong_type, ExitCode.USAGE, "ecdsa-p256, ed25519, rsa")
    no_password = trustplane("key", "generate", "--signing", str(tmp_path / "y"), password=None)
    assert_fails(no_password, ExitCode.USAGE, "COSIGN_PASSWORD")
    twice = trustplane("key", "generate", str(tmp_path / "z"), "--out", str(tmp_path / "z"))
    assert_fails(twice, ExitCode.USAGE, "name the output once")
    # Without --signing it is still the recipient key pair it always was.
    recipient = trustplane("key", "generate", str(tmp_path / "r"))
    assert recipient.returncode == 0, recipient.stderr
    assert (tmp_path / "r.pem").exists()
