"""`trustplane secret | recipient | kek`: the KMS from the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import emit_json, stdout
from trustplane.cli.session import Ca, Server, connect
from trustplane.errors import NotFoundError

secret_app = typer.Typer(help="Secrets kept by the KMS, by reference.", no_args_is_help=True)
recipient_app = typer.Typer(
    help="Image recipients whose private key stays in the KMS.", no_args_is_help=True
)
kek_app = typer.Typer(help="The key-encryption key.", no_args_is_help=True)


@secret_app.command("create")
def create_secret(
    payload_file: Annotated[
        Path | None,
        typer.Option(help="Store this file's bytes (default: generate an AES-256 key)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="A label.")] = None,
    reader: Annotated[
        list[str] | None, typer.Option(help="Subject allowed to read it (user:NAME, node:NAME).")
    ] = None,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Store or generate a secret; prints its reference (keep only that)."""
    payload = None
    if payload_file is not None:
        try:
            payload = payload_file.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{payload_file} does not exist") from None
    with connect(server, ca) as client:
        answer = client.create_secret(
            payload,
            name=name,
            secret_type="opaque" if payload else "symmetric",
            readers=reader or [],
        )
    stdout.print(answer["secret_ref"])


@secret_app.command("show")
def show_secret(secret_id: str, server: Server = None, ca: Ca = None) -> None:
    """Metadata of a secret (never its payload)."""
    with connect(server, ca) as client:
        emit_json(client.secret(secret_id))


@secret_app.command("payload")
def secret_payload(
    secret_id: str,
    out: Annotated[
        Path | None, typer.Option(help="Write here (mode 0600) instead of stdout.")
    ] = None,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Fetch a payload (the ACL and the policy must both allow it; it is logged)."""
    with connect(server, ca) as client:
        payload = client.secret_payload(secret_id)
    if out is None:
        sys.stdout.buffer.write(payload)
        return
    import os

    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)


@secret_app.command("delete")
def delete_secret(secret_id: str, server: Server = None, ca: Ca = None) -> None:
    with connect(server, ca) as client:
        client.delete_secret(secret_id)
    stdout.print(f"deleted {secret_id}")


@recipient_app.command("create")
def create_recipient(
    name: str,
    key_type: Annotated[
        str, typer.Option("--type", help="ec-p256, ec-p384, ec-p521 or rsa.")
    ] = "ec-p256",
    server: Server = None,
    ca: Ca = None,
) -> None:
    """A key pair in the KMS; encrypt for it with --recipient kms:NAME."""
    with connect(server, ca) as client:
        answer = client.create_recipient(name, key_type)
    stdout.print(f"recipient {answer['name']}: key id {answer['key_id']}")


@recipient_app.command("show")
def show_recipient(name: str, server: Server = None, ca: Ca = None) -> None:
    with connect(server, ca) as client:
        emit_json(client.recipient(name))


@kek_app.command("rotate")
def rotate(server: Server = None, ca: Ca = None) -> None:
    """New KEK; every secret is re-wrapped online."""
    with connect(server, ca) as client:
        emit_json(client.rotate_kek())
