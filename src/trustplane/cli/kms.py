"""`trustplane secret | recipient | kek`: the KMS from the command line."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from trustplane.atomic import atomic_write
from trustplane.cli.common import emit_json, output_file, read_file, stdout
from trustplane.cli.session import Ca, Server, connect
from trustplane.crypto.keys import KeyType
from trustplane.errors import UsageError, from_os_error

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
    payload = read_file(payload_file, "--payload-file") if payload_file is not None else None
    with connect(server, ca) as client:
        answer = client.create_secret(
            payload,
            name=name,
            secret_type="opaque" if payload else "symmetric",
            readers=reader or [],
        )
    stdout.print(answer.secret_ref)


SecretId = Annotated[
    str,
    typer.Argument(
        metavar="SECRET", help="The reference `secret create` printed, or the UUID at its end."
    ),
]
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def secret_uuid(secret: str) -> str:
    """The UUID of a secret given as its reference (https://HOST/v1/secrets/UUID) or alone."""
    candidate = secret.rstrip("/").rsplit("/", 1)[-1] if "/v1/secrets/" in secret else secret
    if not _UUID.fullmatch(candidate.lower()):
        raise UsageError(
            f"secret {secret!r}: give the reference secret create printed "
            "(https://HOST/v1/secrets/UUID) or its UUID"
        )
    return candidate.lower()


@secret_app.command("show")
def show_secret(secret: SecretId, server: Server = None, ca: Ca = None) -> None:
    """Metadata of a secret (never its payload)."""
    secret_id = secret_uuid(secret)
    with connect(server, ca) as client:
        emit_json(client.secret(secret_id))


@secret_app.command("payload")
def secret_payload(
    secret: SecretId,
    out: Annotated[
        Path | None, typer.Option(help="Write here (mode 0600) instead of stdout.")
    ] = None,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Fetch a payload (the ACL and the policy must both allow it; it is logged)."""
    secret_id = secret_uuid(secret)
    if out is not None:
        output_file(out, "--out")  # before the fetch, which is logged
    with connect(server, ca) as client:
        payload = client.secret_payload(secret_id)
    if out is None:
        sys.stdout.buffer.write(payload)
        return
    try:  # the whole payload or no file: a full disk leaves nothing behind
        atomic_write(out, payload, mode=0o600)
    except OSError as exc:
        raise from_os_error(exc, out) or exc from None


@secret_app.command("delete")
def delete_secret(secret: SecretId, server: Server = None, ca: Ca = None) -> None:
    """Delete a secret (its payload is gone for good)."""
    secret_id = secret_uuid(secret)
    with connect(server, ca) as client:
        client.delete_secret(secret_id)
    stdout.print(f"deleted {secret_id}")


@recipient_app.command("create")
def create_recipient(
    name: str,
    key_type: Annotated[KeyType, typer.Option("--type", help="The key pair's type.")] = "ec-p256",
    server: Server = None,
    ca: Ca = None,
) -> None:
    """A key pair in the KMS; encrypt for it with --recipient kms:NAME."""
    with connect(server, ca) as client:
        answer = client.create_recipient(name, key_type)
    stdout.print(f"recipient {answer.name}: key id {answer.key_id}")


@recipient_app.command("show")
def show_recipient(name: str, server: Server = None, ca: Ca = None) -> None:
    with connect(server, ca) as client:
        emit_json(client.recipient(name))


@kek_app.command("rotate")
def rotate(server: Server = None, ca: Ca = None) -> None:
    """New KEK; every secret is re-wrapped online."""
    with connect(server, ca) as client:
        emit_json(client.rotate_kek())
