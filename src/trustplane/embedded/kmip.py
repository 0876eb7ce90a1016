"""Start a real KMIP server (PyKMIP's) on 127.0.0.1 with mutual TLS.

The KMS's `KmipKekProvider` is tested against it, and the demo can use it
as a stand-in for an HSM-backed KMIP appliance. Everything lives in one work
dir: a CA with a server certificate for 127.0.0.1/localhost and one client
certificate (extended key usage clientAuth; its common name is the identity
that owns the keys the client creates), the server's config file, its SQLite
database and its logs. Starting again in the same work dir reuses the
certificates and the database, so keys survive a server restart.

PyKMIP 0.11 on Python 3.11, OpenSSL 3 and cryptography 4x-50 works with
this configuration: ``auth_suite=TLS1.2`` (the ``Basic`` suite asks for TLS
1.0, which OpenSSL 3 refuses) and the cipher list restricted to ECDHE-ECDSA
with AES-GCM (its TLS 1.2 default list also offers CBC suites and picks one
of them first). Its deprecated calls only warn (``ssl.PROTOCOL_TLSv1_2``,
TripleDES/ARC4/CFB/OFB moved to ``decrepit``). It runs as
``python -c 'from kmip.services.server.server import main; main()'`` in our
own interpreter, so it needs nothing but the ``pykmip`` package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trustplane.embedded.process import ManagedProcess, StopsOnExit, free_port, tail_lines
from trustplane.embedded.tls import (
    CertificateAuthority,
    ClientCertificate,
    ServerCertificate,
    create_ca,
    issue_client_cert,
    issue_server_cert,
)
from trustplane.errors import UnavailableError

HOST = "127.0.0.1"
DEFAULT_CLIENT = "trustplane-kms"
START_TIMEOUT = 30.0
STOP_GRACE = 3.0
"""PyKMIP joins each open session's thread for up to 10 s when it stops; past this
we kill it (SQLite keeps every committed operation)."""
CIPHER_SUITES = (
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
)
_PORT_ATTEMPTS = 3
_SERVER_MAIN = "import sys; from kmip.services.server.server import main; sys.exit(main())"
_FATAL_MARKERS = ("Traceback (most recent call last)", "Server failed to bind")


@dataclass(frozen=True)
class RunningKmipServer(StopsOnExit):
    """A started KMIP server: where it is, how a client authenticates, and its process."""

    host: str
    port: int
    server_name: str
    ca_file: Path
    client_cert: Path
    client_key: Path
    client_identity: str
    work_dir: Path
    config_file: Path
    database: Path
    log_file: Path
    process: ManagedProcess

    @property
    def ca(self) -> CertificateAuthority:
        """The CA that issued the server's and the client's certificates."""
        return CertificateAuthority(
            cert_file=self.ca_file, key_file=self.work_dir / "tls" / "ca-key.pem"
        )

    def stop(self) -> None:
        """Stop the server; its database and certificates stay in `work_dir`.

        SIGINT first: PyKMIP's SIGTERM handler only takes effect when its
        accept() times out (10 s), SIGINT interrupts it and it exits cleanly
        in about a second. ManagedProcess then terminates what is left.
        """
        pid = self.process.pid
        if pid is not None and self.process.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + STOP_GRACE
            while self.process.running() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.process.stop()


def start_kmip_server(
    work_dir: Path,
    *,
    port: int | None = None,
    client_name: str = DEFAULT_CLIENT,
    logging_level: str = "WARNING",
    timeout: float = START_TIMEOUT,
) -> RunningKmipServer:
    """Start PyKMIP's server in `work_dir` and wait until a mutual-TLS handshake succeeds.

    `port`: a fixed port (to restart a server where clients expect it);
    otherwise a free one. `logging_level` is PyKMIP's: INFO writes four
    lines per request and costs a fifth of its throughput.
    """
    if importlib.util.find_spec("kmip") is None:
        raise UnavailableError("PyKMIP is not installed; pip install pykmip")
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    work_dir.chmod(0o700)  # the SQLite database holds the keys in plaintext
    ca, server, client = _ensure_tls(work_dir / "tls", client_name)
    policy_dir = work_dir / "policies"
    policy_dir.mkdir(exist_ok=True)
    database = work_dir / "kmip.sqlite"
    log_file = work_dir / "pykmip-server.log"
    config_file = work_dir / "server.conf"
    last_error: UnavailableError | None = None
    for _ in range(1 if port is not None else _PORT_ATTEMPTS):
        chosen = port if port is not None else free_port(HOST)
        config_file.write_text(
            server_config(
                chosen,
                server=server,
                ca=ca,
                policy_dir=policy_dir,
                database=database,
                logging_level=logging_level,
            ),
            encoding="utf-8",
        )
        process = ManagedProcess(
            "kmip-server",
            [sys.executable, "-c", _SERVER_MAIN, "-f", str(config_file), "-l", str(log_file)],
            work_dir,
            ready=_KmipReady(chosen, client, work_dir / "kmip-server.log"),
            timeout=timeout,
            grace=STOP_GRACE,
        )
        try:
            process.start()
        except UnavailableError as exc:
            if "failed to bind" not in str(exc).lower() or port is not None:
                raise
            last_error = exc
            continue
        return RunningKmipServer(
            host=HOST,
            port=chosen,
            server_name=HOST,
            ca_file=ca.cert_file,
            client_cert=client.cert_file,
            client_key=client.key_file,
            client_identity=client.common_name,
            work_dir=work_dir,
            config_file=config_file,
            database=database,
            log_file=log_file,
            process=process,
        )
    assert last_error is not None
    raise last_error


def server_config(
    port: int,
    *,
    server: ServerCertificate,
    ca: CertificateAuthority,
    policy_dir: Path,
    database: Path,
    logging_level: str = "WARNING",
) -> str:
    """PyKMIP's server.conf (INI): TLS 1.2, AES-GCM suites, client certificates required."""
    return "\n".join(
        [
            "[server]",
            f"hostname={HOST}",
            f"port={port}",
            f"certificate_path={server.cert_file}",
            f"key_path={server.key_file}",
            f"ca_path={ca.cert_file}",
            "auth_suite=TLS1.2",
            f"policy_path={policy_dir}",
            "enable_tls_client_auth=True",
            f"tls_cipher_suites={' '.join(CIPHER_SUITES)}",
            f"logging_level={logging_level}",
            f"database_path={database}",
            "",
        ]
    )


def _ensure_tls(
    directory: Path, client_name: str
) -> tuple[CertificateAuthority, ServerCertificate, ClientCertificate]:
    """The work dir's CA and certificates, made on first start and reused after."""
    ca = CertificateAuthority(cert_file=directory / "ca.pem", key_file=directory / "ca-key.pem")
    if not (ca.cert_file.is_file() and ca.key_file.is_file()):
        ca = create_ca(directory, "trustplane KMIP test CA")
    server = ServerCertificate(
        cert_file=directory / "kmip-server.pem",
        key_file=directory / "kmip-server-key.pem",
        ca_file=ca.cert_file,
        dns_names=("localhost",),
        ip_addresses=(HOST,),
    )
    if not (server.cert_file.is_file() and server.key_file.is_file()):
        server = issue_server_cert(ca, directory, "kmip-server")
    client = ClientCertificate(
        cert_file=directory / f"{client_name}.pem",
        key_file=directory / f"{client_name}-key.pem",
        ca_file=ca.cert_file,
        common_name=client_name,
    )
    if not (client.cert_file.is_file() and client.key_file.is_file()):
        client = issue_client_cert(ca, directory, client_name)
    return ca, server, client


@dataclass(frozen=True)
class _KmipReady:
    """Ready when a mutual-TLS handshake succeeds; raises when the server logged a fatal error.

    PyKMIP does not exit when it fails to start (its policy monitor thread
    keeps the process alive), so waiting for the exit would waste the whole
    timeout.
    """

    port: int
    client: ClientCertificate
    output: Path

    def __call__(self) -> bool:
        if any(marker in tail_lines(self.output, 40) for marker in _FATAL_MARKERS):
            time.sleep(0.5)  # let it finish writing the traceback we quote
            raise UnavailableError(
                f"PyKMIP server failed to start; last lines of {self.output}:\n"
                f"{tail_lines(self.output, 40)}"
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.client.ca_file))
        context.load_cert_chain(str(self.client.cert_file), str(self.client.key_file))
        try:
            with (
                socket.create_connection((HOST, self.port), timeout=1.0) as raw,
                context.wrap_socket(raw, server_hostname=HOST),
            ):
                return True
        except OSError:
            return False
