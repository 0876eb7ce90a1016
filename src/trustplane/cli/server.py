"""`trustplane server`, `trustplane login`."""

from __future__ import annotations

import getpass
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import stdout
from trustplane.cli.session import Ca, Session, save
from trustplane.client import ControlClient


def server(
    data_dir: Annotated[Path, typer.Option(help="Where the server keeps its state.")],
    listen: Annotated[str | None, typer.Option(help="HOST:PORT (default 127.0.0.1:8443).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Settings file (default DATA_DIR/server.yaml).")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default SQLite).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
) -> None:
    """Run the control plane: identity, policy, KMS and transparency log over HTTPS."""
    from trustplane.control.server import serve
    from trustplane.control.settings import load_settings

    settings = load_settings(
        data_dir, config, listen=listen, database_url=database_url, workers=workers
    )
    stdout.print(f"trustplane server on {settings.url} (data in {settings.data_dir})")
    serve(settings)


def login(
    server_url: Annotated[str, typer.Option("--server", help="Control plane URL.")],
    user: Annotated[str, typer.Option(help="User name.")] = "admin",
    ca: Ca = None,
    password_stdin: Annotated[bool, typer.Option(help="Read the password from stdin.")] = False,
    gateway: Annotated[
        list[str] | None,
        typer.Option(help="Scope the token to this edge gateway (repeatable); others refuse it."),
    ] = None,
) -> None:
    """Get a token and keep it for later commands (mode 0600)."""
    password = sys.stdin.readline().rstrip("\n") if password_stdin else getpass.getpass()
    with ControlClient(server_url, ca) as client:
        answer = client.login(user, password, gateways=gateway or None)
        who = client.whoami()
    save(
        Session(
            server=server_url,
            ca_file=str(ca.resolve()) if ca else None,
            token=answer["access_token"],
            expires=time.time() + int(answer["expires_in"]) - 5,
            subject=who["subject"],
        )
    )
    stdout.print(f"logged in to {server_url} as {who['subject']} ({who['role']})")
