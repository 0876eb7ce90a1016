"""What the command-line tests share: key pairs, a small image in an OCI layout and
that image encrypted in tiers, all made here (no Docker, no registry)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import build_layout, run_cli

from trustplane.crypto.keys import generate_key_pair

SECRET = b"s3cr3t for the cli tests\n"


@pytest.fixture(scope="session")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Keys (alice: everything; bob: tier 1; eve: a recipient of nothing), a file
    that is not PEM, a directory, an image and the image encrypted for alice
    and bob (layers 1 and 2 encrypted; bob's tier reaches layer 1 only)."""
    root = tmp_path_factory.mktemp("cli-material")
    paths: dict[str, Path] = {}
    for name in ("alice", "bob", "eve"):
        private, public = generate_key_pair("ec-p256")
        paths[f"{name}_pem"] = root / f"{name}.pem"
        paths[f"{name}_pub"] = root / f"{name}.pub"
        paths[f"{name}_pem"].write_bytes(private)
        paths[f"{name}_pub"].write_bytes(public)
    paths["notpem"] = root / "notes.txt"
    paths["notpem"].write_text("this is not a PEM file\n")
    paths["dir"] = root / "a-directory"
    paths["dir"].mkdir()
    paths["layout"] = build_layout(
        root / "image",
        [
            {"bin/tool": b"#!/bin/sh\necho base\n"},
            {"app/run.sh": b"#!/bin/sh\ncat /secrets/token\n"},
            {"secrets/token": SECRET},
        ],
    )
    paths["encrypted"] = root / "encrypted"
    made = run_cli(
        "image",
        "encrypt",
        f"oci:{paths['layout']}:v1",
        f"oci:{paths['encrypted']}:v1",
        "--recipient",
        f"jwe:{paths['alice_pub']}",
        "--recipient",
        f"jwe:{paths['bob_pub']}:tier=1",
        "--layers",
        "1,2",
        "--quiet",
    )
    assert made.returncode == 0, made.stderr
    return paths
