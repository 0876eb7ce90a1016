"""The options that say which node a command acts as: `trustplane agent` and
`trustplane run` share them, and must agree (same TPM, same state directory).

Each is checked as the command line is parsed, so a wrong one is one error
naming the option before anything is opened, created or contacted."""

from __future__ import annotations

import ctypes.util
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization

from trustplane.cli.common import read_file, state_directory
from trustplane.cli.session import ServerUrl as ServerUrl
from trustplane.errors import MalformedError, UsageError
from trustplane.trust.attestation import DEFAULT_PCR as DEFAULT_PCR  # the one default


def check_tcti(tcti: str) -> str:
    """NAME[:CONFIG], where libtss2-tcti-NAME is installed (what tpm2-tss will load)."""
    name = tcti.partition(":")[0]
    if ".so" in name:  # a library named in full: the loader takes it as it is
        return tcti
    if not name or ctypes.util.find_library(f"tss2-tcti-{name}") is None:
        raise UsageError(
            f"--tpm {tcti!r}: no TCTI {name!r} is installed (libtss2-tcti-{name}); "
            "use device:/dev/tpmrm0, swtpm:host=H,port=P, mssim:..."
        )
    return tcti


def check_node_key(path: Path | None) -> Path | None:
    """An unencrypted PEM private key (the node signs its token requests with it)."""
    if path is None:
        return None
    try:
        serialization.load_pem_private_key(read_file(path, "--node-key"), password=None)
    except (ValueError, TypeError):
        raise MalformedError(f"--node-key {path}: not an unencrypted PEM private key") from None
    return path


def check_state_dir(path: Path) -> Path:
    return state_directory(path, "--state-dir")


NodeName = Annotated[str, typer.Option("--node", help="This node's registered name.")]
TpmTcti = Annotated[
    str,
    typer.Option(
        "--tpm",
        help="TCTI of the TPM: device:/dev/tpmrm0, swtpm:host=H,port=P, ...",
        callback=check_tcti,
    ),
]
NodeKey = Annotated[
    Path,
    typer.Option(
        "--node-key", help="The node's private key (PEM) for its token.", callback=check_node_key
    ),
]
StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        help="The agent's state: transport key, enrolment record, event log.",
        callback=check_state_dir,
    ),
]
TransportStateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        help="The node agent's state: volume keys come wrapped to the transport key its "
        "TPM certified there (none there: a throw-away key per attach).",
        callback=check_state_dir,
    ),
]
Pcr = Annotated[
    int,
    typer.Option(
        "--pcr",
        min=0,
        max=23,
        help="PCR (sha256 bank) for layer measurements: one of 0-15, which nobody resets "
        "without a reboot (13: unused by firmware, GRUB, shim and IMA).",
    ),
]
InsecureResettablePcr = Annotated[
    bool,
    typer.Option(
        "--insecure-resettable-pcr-for-tests",
        help="TESTS ONLY: accept --pcr 16 or 23, which any root user resets with "
        "tpm2_pcrreset. Never on a real node.",
    ),
]

DEFAULT_TPM = "device:/dev/tpmrm0"
DEFAULT_NODE_KEY = Path("node.key")
DEFAULT_STATE_DIR = Path("/var/lib/trustplane/agent")
