"""Start a software TPM 2.0 (swtpm) on 127.0.0.1 with its own state directory.

    swtpm socket --tpm2 --server type=tcp,port=P,bindaddr=127.0.0.1
                 --ctrl type=tcp,port=P+1,bindaddr=127.0.0.1
                 --tpmstate dir=D --flags not-need-init,startup-clear

The TPM is cleared and started by swtpm itself. By default it has no EK
certificate (the EK is the deterministic primary key of the endorsement
hierarchy, created from the default template by whoever asks). With
`ek_certificate=True` the state is first manufactured by `swtpm_setup`
(package swtpm-tools), which writes RSA and ECC EK certificates into the
TPM's NV, issued by a local CA (`swtpm_localca`) made in work_dir/ca: the
stand-in for a TPM vendor's CA. TSS software reaches the TPM through the
TCTI string `swtpm:host=127.0.0.1,port=P`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from trustplane.embedded.process import (
    ManagedProcess,
    StopsOnExit,
    TcpReady,
    free_port,
    require_binary,
)
from trustplane.errors import UnavailableError

START_TIMEOUT = 15.0
_PORT_ATTEMPTS = 5


@dataclass(frozen=True)
class RunningSwtpm(StopsOnExit):
    host: str
    port: int
    ctrl_port: int
    state_dir: Path
    process: ManagedProcess
    ek_ca_file: Path | None = None
    """The local CA that issued the EK certificates (with ek_certificate=True)."""

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    def stop(self) -> None:
        self.process.stop()

    def power_cycle(self) -> RunningSwtpm:
        """Turn the TPM off and on, as a reboot of its machine does: the same
        state directory, a fresh TPM2_Startup(CLEAR) (PCRs 0-15 back to zero,
        resetCount + 1). The TPM listens on new ports: use the returned one."""
        self.stop()
        return start_swtpm(self.state_dir.parent, existing=True)


def manufacture(work_dir: Path, state_dir: Path) -> Path:
    """Provision EKs and their certificates into `state_dir` with a local CA;
    returns the PEM of the CA certificate that issued the EK certificates."""
    setup = require_binary("swtpm_setup", "swtpm-tools")
    localca = require_binary("swtpm_localca", "swtpm-tools")
    ca_dir = work_dir / "ca"
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (work_dir / "localca.conf").write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir / 'signkey.pem'}\n"
        f"issuercert = {ca_dir / 'issuercert.pem'}\n"
        f"certserial = {ca_dir / 'certserial'}\n"
    )
    (work_dir / "localca.options").write_text("")
    (work_dir / "swtpm_setup.conf").write_text(
        f"create_certs_tool = {localca}\n"
        f"create_certs_tool_config = {work_dir / 'localca.conf'}\n"
        f"create_certs_tool_options = {work_dir / 'localca.options'}\n"
    )
    result = subprocess.run(
        [
            setup,
            "--tpm2",
            "--tpmstate",
            str(state_dir),
            "--create-ek-cert",
            "--config",
            str(work_dir / "swtpm_setup.conf"),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UnavailableError(f"swtpm_setup failed: {' / '.join(tail)}")
    return ca_dir / "issuercert.pem"


def start_swtpm(
    work_dir: Path,
    timeout: float = START_TIMEOUT,
    *,
    ek_certificate: bool = False,
    existing: bool = False,
) -> RunningSwtpm:
    """Start swtpm in `work_dir` (state in work_dir/state) and wait until it
    listens; `existing`: the TPM made there before, as it was left."""
    binary = require_binary("swtpm", "swtpm")
    state_dir = work_dir / "state"
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_file = None
    if existing:
        issued = work_dir / "ca" / "issuercert.pem"
        ca_file = issued if issued.exists() else None
    elif ek_certificate:
        ca_file = manufacture(work_dir, state_dir)
    host = "127.0.0.1"
    last_error: UnavailableError | None = None
    for _ in range(_PORT_ATTEMPTS):
        port = free_port(host)
        ctrl = port + 1
        process = ManagedProcess(
            "swtpm",
            [
                binary,
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={port},bindaddr={host}",
                "--ctrl",
                f"type=tcp,port={ctrl},bindaddr={host}",
                "--tpmstate",
                f"dir={state_dir}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            work_dir,
            ready=TcpReady(port, host),
            timeout=timeout,
            grace=3.0,
        )
        try:
            process.start()
        except UnavailableError as exc:
            # P+1 is not reserved by free_port(); another program may hold it.
            last_error = exc
            continue
        return RunningSwtpm(
            host=host,
            port=port,
            ctrl_port=ctrl,
            state_dir=state_dir,
            process=process,
            ek_ca_file=ca_file,
        )
    assert last_error is not None
    raise last_error
