"""`trustplane server`, `trustplane login`."""

from __future__ import annotations

import getpass
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import state_directory, stdout
from trustplane.cli.session import Ca, ServerUrl, Session, save
from trustplane.client import ControlClient
from trustplane.errors import UsageError


def server(
    data_dir: Annotated[Path, typer.Option(help="Where the server keeps its state.")],
    listen: Annotated[str | None, typer.Option(help="HOST:PORT (default 127.0.0.1:8443).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Settings file (default DATA_DIR/server.yaml).")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default SQLite).")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="Worker processes.")] = None,
) -> None:
    """Run the control plane: identity, policy, KMS and transparency log over HTTPS."""
    from trustplane.control.db import database_url as check_database
    from trustplane.control.server import bind_listener, serve
    from trustplane.control.settings import load_settings

    state_directory(data_dir, "--data-dir")
    settings = load_settings(
        data_dir, config, listen=listen, database_url=database_url, workers=workers
    )
    state_directory(settings.data_dir, "data_dir")
    check_database(settings.db_url)
    listener = bind_listener(settings)  # a port in use fails here: nothing is made yet
    stdout.print(f"trustplane server on {settings.url} (data in {settings.data_dir})")
    serve(settings, listener)


def login(
    server_url: ServerUrl,
    user: Annotated[str, typer.Option(help="User name.")] = "admin",
    ca: Ca = None,
    password_stdin: Annotated[bool, typer.Option(help="Read the password from stdin.")] = False,
    gateway: Annotated[
        list[str] | None,
        typer.Option(help="Scope the token to this edge gateway (repeatable); others refuse it."),
    ] = None,
) -> None:
    """Get a token and keep it for later commands (mode 0600)."""
    password = sys.stdin.readline().rstrip("\n") if password_stdin else _ask_password()
    with ControlClient(server_url, ca) as client:
        answer = client.login(user, password, gateways=gateway or None)
        who = client.whoami()
    save(
        Session(
            server=server_url,
            ca_file=str(ca.resolve()) if ca else None,
            token=answer.access_token,
            expires=time.time() + answer.expires_in - 5,
            subject=who.subject,
        )
    )
    stdout.print(f"logged in to {server_url} as {who.subject} ({who.role})")


def _ask_password() -> str:
    """A prompt on the terminal, as getpass does; without one, say how to pipe it."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        raise UsageError(
            "no terminal to ask for the password on: pipe it in with --password-stdin"
        ) from None
    try:
        return getpass.getpass()
    except EOFError:
        raise UsageError("no password given") from None
