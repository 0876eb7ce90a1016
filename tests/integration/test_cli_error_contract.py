"""The error contract where a registry or the control plane takes part.

The rows that need no component are in tests/cli/test_cli_errors.py; these
need the real thing: a registry that refuses credentials, a policy that
denies, a push interrupted with Ctrl-C (SIGINT) mid-upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.registry import RunningRegistry
from trustplane.errors import ExitCode

MIB = 1 << 20


def trustplane(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustplane", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # no controlling terminal, as under CI or cron
    )


def one_line(result: subprocess.CompletedProcess[str], code: ExitCode, text: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trustplane: error: ")
    assert text in lines[0], lines[0]
    return lines[0]


def upload_data(registry: RunningRegistry, repository: str) -> list[Path]:
    """Upload sessions holding data. (distribution 2.8 leaves an empty
    `hashstates/sha256/0` behind for each session it cancels: not data.)"""
    uploads = registry.storage_dir / "docker/registry/v2/repositories" / repository / "_uploads"
    return sorted(uploads.glob("*/data"))


def one_layer_layout(root: Path, layer: bytes | None, size: int, digest: str) -> None:
    """An OCI layout with one layer; `layer` None: its blob is a FIFO the test feeds."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def store(data: bytes) -> str:
        hexdigest = hashlib.sha256(data).hexdigest()
        (blobs / hexdigest).write_bytes(data)
        return "sha256:" + hexdigest

    if layer is None:
        os.mkfifo(blobs / digest.removeprefix("sha256:"))
    else:
        store(layer)
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest]}})
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": store(config.encode()),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest,
                    "size": size,
                }
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": store(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


# -- registries -------------------------------------------------------------------------


@pytest.fixture
def small_layout(tmp_path: Path) -> Path:
    layer = os.urandom(300_000)
    one_layer_layout(
        tmp_path / "small", layer, len(layer), "sha256:" + hashlib.sha256(layer).hexdigest()
    )
    return tmp_path / "small"


def test_a_registry_refusing_the_credentials_says_so(
    registry_tls: RunningRegistry, small_layout: Path
) -> None:
    assert registry_tls.ca_file is not None
    repository = "cli-errors/refused"
    result = trustplane(
        "image",
        "copy",
        f"oci:{small_layout}:v1",
        f"docker://{registry_tls.host}/{repository}:1",
        "--dest-cacert",
        str(registry_tls.ca_file),
        "--dest-creds",
        f"{registry_tls.username}:not-the-password",
    )
    one_line(result, ExitCode.AUTH, f"refused the credentials of {registry_tls.username!r}")
    assert upload_data(registry_tls, repository) == []


def test_a_registry_wanting_credentials_says_so(
    registry_tls: RunningRegistry, small_layout: Path, tmp_path: Path
) -> None:
    assert registry_tls.ca_file is not None
    result = trustplane(
        "image",
        "copy",
        f"oci:{small_layout}:v1",
        f"docker://{registry_tls.host}/cli-errors/anonymous:1",
        "--dest-cacert",
        str(registry_tls.ca_file),
        env={"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": "", "XDG_RUNTIME_DIR": ""},
    )
    one_line(result, ExitCode.AUTH, "requires credentials")


# -- Ctrl-C during a push ------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [(), ("--dest-chunk-size", "1")], ids=["streamed", "chunked"])
def test_ctrl_c_during_a_push_leaves_no_upload_in_the_registry(
    registry_plain: RunningRegistry, tmp_path: Path, chunks: tuple[str, ...]
) -> None:
    """SIGINT to the CLI while a layer is on its way: exit 130, one line, and the
    registry's `_uploads` holds no data (the session was deleted, not abandoned).

    The layer's blob is a FIFO fed by the test, so the push is certainly under
    way (half the layer has reached the registry) when the signal is sent."""
    layer = os.urandom(8 * MIB)
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    layout = tmp_path / "fifo"
    one_layer_layout(layout, None, len(layer), digest)
    repository = f"cli-errors/interrupted-{len(chunks)}"
    push = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trustplane",
            "image",
            "copy",
            f"oci:{layout}:v1",
            f"docker://{registry_plain.host}/{repository}:1",
            "--quiet",
            *chunks,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        with (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).open("wb") as fifo:
            fifo.write(layer[: 4 * MIB])
            fifo.flush()
            deadline = time.monotonic() + 120
            while not any(p.stat().st_size for p in upload_data(registry_plain, repository)):
                assert push.poll() is None, push.communicate()
                assert time.monotonic() < deadline, "the upload never reached the registry"
                time.sleep(0.05)
            push.send_signal(signal.SIGINT)
            out, err = push.communicate(timeout=120)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
    assert push.returncode == ExitCode.INTERRUPTED == 130, err
    assert err == "trustplane: error: interrupted\n"
    assert out == ""
    assert upload_data(registry_plain, repository) == []
    tags = (
        registry_plain.storage_dir / "docker/registry/v2/repositories" / repository / "_manifests"
    )
    assert not tags.exists()


# -- the control plane -----------------------------------------------------------------------------


@pytest.fixture
def admin_session(control_plane: RunningControlPlane, tmp_path: Path) -> dict[str, str]:
    env = {"TRUSTPLANE_SESSION": str(tmp_path / "session.json")}
    login = trustplane(
        "login",
        "--server",
        control_plane.url,
        "--ca",
        str(control_plane.ca_file),
        "--password-stdin",
        stdin=control_plane.admin_password + "\n",
        env=env,
    )
    assert login.returncode == 0, login.stderr
    return env


def test_a_wrong_password_is_one_line(control_plane: RunningControlPlane) -> None:
    result = trustplane(
        "login",
        "--server",
        control_plane.url,
        "--ca",
        str(control_plane.ca_file),
        "--password-stdin",
        stdin="not the password\n",
    )
    one_line(result, ExitCode.AUTH, "control plane")


def test_a_denial_says_why_on_stderr(admin_session: dict[str, str]) -> None:
    result = trustplane("authorize", "contaner.start", "container:web", env=admin_session)
    line = one_line(result, ExitCode.AUTH, "denied: unknown action 'contaner.start' (log entry ")
    answer = json.loads(result.stdout)  # the decision itself stays on stdout, for scripts
    assert answer["decision"] == "deny"
    assert f"(log entry {answer['log_index']})" in line


def test_secret_commands_take_the_reference_create_printed(
    admin_session: dict[str, str], tmp_path: Path
) -> None:
    created = trustplane("secret", "create", "--name", "cli-errors", env=admin_session)
    assert created.returncode == 0, created.stderr
    reference = created.stdout.strip()
    uuid = reference.rsplit("/", 1)[-1]
    assert reference.startswith("https://")
    for given in (reference, uuid):
        shown = trustplane("secret", "show", given, env=admin_session)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["id"] == uuid
    out = tmp_path / "key.bin"
    fetched = trustplane("secret", "payload", reference, "--out", str(out), env=admin_session)
    assert fetched.returncode == 0, fetched.stderr
    assert len(out.read_bytes()) == 32
    assert out.stat().st_mode & 0o777 == 0o600
    deleted = trustplane("secret", "delete", reference, env=admin_session)
    assert deleted.returncode == 0, deleted.stderr
    one_line(trustplane("secret", "show", uuid, env=admin_session), ExitCode.NOT_FOUND, uuid)
