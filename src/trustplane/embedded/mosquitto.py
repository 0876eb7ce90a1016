"""A private mosquitto broker on 127.0.0.1 for the gateway's MQTT link.

Its own config file (nothing from /etc/mosquitto): one TLS listener with a
certificate from the embedded CA, no anonymous clients, a password file
written with `mosquitto_passwd` (the password on its stdin, never in argv),
and an ACL that limits every gateway to its own topics:

- a gateway `NAME` may read `trustplane/gw/NAME/cmd` and write
  `trustplane/gw/NAME/up/#` (status, results, reports), nothing else;
- the control plane's user (`CONTROL_USER`) may write every gateway's `cmd`
  topic and read every gateway's `up` topics.

Users are added with `add_user` (the broker rereads both files on SIGHUP).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from trustplane.embedded.process import ManagedProcess, TcpReady, free_port, require_binary
from trustplane.embedded.tls import CertificateAuthority, issue_server_cert
from trustplane.tools import Executor

CONTROL_USER = "trustplane-control"
TOPIC_ROOT = "trustplane/gw"


def command_topic(gateway: str) -> str:
    return f"{TOPIC_ROOT}/{gateway}/cmd"


def up_topic(gateway: str, kind: str) -> str:
    return f"{TOPIC_ROOT}/{gateway}/up/{kind}"


@dataclass
class RunningMosquitto:
    host: str
    port: int
    ca_file: Path
    password_file: Path
    process: ManagedProcess
    control_password: str = field(repr=False)

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def add_user(self, name: str, password: str | None = None) -> str:
        """Add (or reset) a broker user; returns the password. Reloads the broker."""
        if not name or any(c in name for c in ":/#+ \n") or len(name) > 64:
            raise ValueError(f"bad broker user name {name!r}")
        password = password or secrets.token_urlsafe(18)
        _passwd(self.password_file, name, password)
        pid = self.process.pid
        if pid is not None:
            os.kill(pid, signal.SIGHUP)
            time.sleep(0.3)  # the reload is asynchronous
        return password

    def stop(self) -> None:
        self.process.stop()


def _passwd(password_file: Path, name: str, password: str) -> None:
    tool = require_binary("mosquitto_passwd", "mosquitto")
    args = [tool, str(password_file), name]
    if not password_file.exists():
        args.insert(1, "-c")
    if "\n" in password:
        raise ValueError("an MQTT password is one line")
    # Without -b it reads the password and its confirmation from stdin.
    line = password.encode("utf-8") + b"\n"
    Executor().run(args, stdin=line + line, timeout=30)
    password_file.chmod(0o600)


def start_mosquitto(
    work_dir: Path, ca: CertificateAuthority, port: int | None = None
) -> RunningMosquitto:
    binary = require_binary("mosquitto", "mosquitto")
    work_dir.mkdir(parents=True, exist_ok=True)
    cert = issue_server_cert(ca, work_dir / "tls", "mosquitto")
    port = port or free_port()
    password_file = work_dir / "passwd"
    control_password = secrets.token_urlsafe(18)
    _passwd(password_file, CONTROL_USER, control_password)
    acl = work_dir / "acl"
    acl.write_text(
        f"user {CONTROL_USER}\n"
        f"topic write {TOPIC_ROOT}/+/cmd\n"
        f"topic read {TOPIC_ROOT}/+/up/#\n"
        "\n"
        f"pattern read {TOPIC_ROOT}/%u/cmd\n"
        f"pattern write {TOPIC_ROOT}/%u/up/#\n"
    )
    acl.chmod(0o600)
    config = work_dir / "mosquitto.conf"
    config.write_text(
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {password_file}\n"
        f"acl_file {acl}\n"
        "persistence false\n"
        "log_dest stdout\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        # Run as root in the test machine: keep the user so the 0600 files stay readable.
        f"{'user root' if os.getuid() == 0 else ''}\n"
        f"listener {port} 127.0.0.1\n"
        f"cafile {cert.ca_file}\n"
        f"certfile {cert.cert_file}\n"
        f"keyfile {cert.key_file}\n"
    )
    process = ManagedProcess(
        "mosquitto",
        [binary, "-c", str(config)],
        work_dir,
        ready=TcpReady(port),
        timeout=30,
    ).start()
    return RunningMosquitto(
        "127.0.0.1", port, cert.ca_file, password_file, process, control_password
    )
