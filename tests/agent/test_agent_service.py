"""The node agent refuses a node key that cannot log in, before it does anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.agent.service import Agent, AgentConfig
from trustplane.errors import UnsupportedError, UsageError


def _config(tmp_path: Path, key_file: Path) -> AgentConfig:
    return AgentConfig(
        server_url="https://127.0.0.1:9",
        tcti="swtpm:host=127.0.0.1,port=9",
        node="edge-1",
        node_key=key_file,
        state_dir=tmp_path / "state",
    )


def test_an_unsupported_node_key_is_one_clear_error(tmp_path: Path) -> None:
    key_file = tmp_path / "edge.pem"
    key_file.write_bytes(
        ec.generate_private_key(ec.SECP256K1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(UnsupportedError) as refused:
        Agent(_config(tmp_path, key_file))
    assert str(refused.value) == (
        f"--node-key {key_file}: an EC key on curve secp256k1 cannot sign node assertions; "
        "use EC P-256, P-384 or P-521, Ed25519, or RSA"
    )


def test_a_missing_node_key_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No such file"):
        Agent(_config(tmp_path, tmp_path / "absent.pem"))
