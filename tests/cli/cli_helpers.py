"""Running `python -m trustplane` as a user does, and reading its error contract."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from trustplane.errors import ExitCode
from trustplane.oci import mediatypes
from trustplane.oci.layout import LayoutWriter
from trustplane.oci.model import Descriptor, Manifest, sha256_digest

Result = subprocess.CompletedProcess[str]


def run_cli(
    *args: str,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    wrap: Sequence[str] = (),
    timeout: float = 300,
) -> Result:
    """`python -m trustplane ARGS` in a session of its own: no controlling
    terminal (as under cron or CI), stdin empty unless given. `wrap` runs it
    through another command (unshare, to give it a full disk)."""
    return subprocess.run(
        [*wrap, sys.executable, "-m", "trustplane", *args],
        input=stdin or "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def assert_one_line_error(result: Result, code: ExitCode | int, text: str) -> str:
    """The README's promise: the documented code, and exactly one line on stderr,
    `trustplane: error: ...`, that says what is wrong."""
    lines = result.stderr.splitlines()
    assert result.returncode == code, f"exit {result.returncode}, wanted {code}: {result.stderr}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {result.stderr}"
    assert lines[0].startswith("trustplane: error: "), lines[0]
    assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "internal error" not in lines[0]
    return lines[0]


def tar_of(files: Mapping[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build_layout(root: Path, layers: Sequence[Mapping[str, bytes]], tag: str = "v1") -> Path:
    """An OCI layout of uncompressed tar layers (their digests are their diff_ids)."""
    blobs = [tar_of(files) for files in layers]
    writer = LayoutWriter(root)
    descriptors = tuple(
        Descriptor(media_type=mediatypes.OCI_LAYER, digest=writer.stage_bytes(blob), size=len(blob))
        for blob in blobs
    )
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b) for b in blobs]},
            "history": [{"created_by": f"layer {i}"} for i in range(len(blobs))],
        }
    ).encode()
    manifest = Manifest(
        schema_version=2,
        media_type=mediatypes.OCI_MANIFEST,
        config=Descriptor(
            media_type=mediatypes.OCI_CONFIG, digest=writer.stage_bytes(config), size=len(config)
        ),
        layers=descriptors,
    )
    writer.commit(manifest.to_bytes(), mediatypes.OCI_MANIFEST, tag)
    writer.close(committed=True)
    return root
