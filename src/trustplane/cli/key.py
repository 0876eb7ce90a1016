"""`trustplane key generate | id`: recipient key pairs for image encryption."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import stdout
from trustplane.crypto.keys import KEY_TYPES, generate_key_pair, key_id
from trustplane.errors import NotFoundError, UsageError

app = typer.Typer(help="Key pairs that receive layer keys.", no_args_is_help=True)


@app.command()
def generate(
    out: Annotated[Path, typer.Argument(help="Writes OUT.pem (private, 0600) and OUT.pub.")],
    key_type: Annotated[str, typer.Option("--type", help=", ".join(KEY_TYPES))] = "ec-p256",
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Generate a key pair (PKCS#8 private key, as skopeo needs)."""
    if key_type not in KEY_TYPES:
        raise UsageError(f"--type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")
    private_path, public_path = out.with_suffix(".pem"), out.with_suffix(".pub")
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise UsageError(f"{path} exists; use --force to overwrite it")
    private_pem, public_pem = generate_key_pair(key_type)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    stdout.print(f"{private_path} {public_path} key id {key_id(public_pem, str(public_path))}")


@app.command("id")
def show_id(
    path: Annotated[Path, typer.Argument(help="A public key, certificate or private key.")],
) -> None:
    """Print a key's id (RFC 7638 thumbprint), as `image inspect` shows it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    stdout.print(key_id(data, str(path)))
