"""The options that say which node a command acts as: `trustplane agent` and
`trustplane run` share them, and must agree (same TPM, same state directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ServerUrl = Annotated[str, typer.Option("--server", help="Control plane URL.")]
NodeName = Annotated[str, typer.Option("--node", help="This node's registered name.")]
TpmTcti = Annotated[
    str,
    typer.Option("--tpm", help="TCTI of the TPM: device:/dev/tpmrm0, swtpm:host=H,port=P, ..."),
]
NodeKey = Annotated[
    Path, typer.Option("--node-key", help="The node's private key (PEM) for its token.")
]
StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir", help="The agent's state: transport key, enrolment record, event log."
    ),
]
Pcr = Annotated[int, typer.Option("--pcr", help="PCR (sha256 bank) for layer measurements.")]

DEFAULT_TPM = "device:/dev/tpmrm0"
DEFAULT_NODE_KEY = Path("node.key")
DEFAULT_STATE_DIR = Path("/var/lib/trustplane/agent")
DEFAULT_PCR = 23
