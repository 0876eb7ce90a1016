"""`trustplane key generate | id`: recipient key pairs for image encryption, and
image-signing key pairs in cosign's format."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import stdout
from trustplane.crypto.keys import KEY_TYPES, generate_key_pair, key_id
from trustplane.crypto.signing import (
    SIGNING_KEY_TYPES,
    encrypt_private_key,
    generate_signing_key,
)
from trustplane.errors import NotFoundError, UsageError
from trustplane.oci.layout import atomic_write

PASSWORD_ENV = "COSIGN_PASSWORD"  # noqa: S105 - the name of the variable, as cosign reads it

app = typer.Typer(
    help="Key pairs that receive layer keys, and image-signing key pairs.", no_args_is_help=True
)


@app.command()
def generate(
    out: Annotated[
        Path | None, typer.Argument(help="Writes OUT.pem (private, 0600) and OUT.pub.")
    ] = None,
    out_option: Annotated[
        Path | None, typer.Option("--out", help="Same as OUT (the path prefix).")
    ] = None,
    key_type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help=f"Recipient keys: {', '.join(KEY_TYPES)} (default ec-p256); signing keys: "
            f"{', '.join(SIGNING_KEY_TYPES)} (default ecdsa-p256).",
        ),
    ] = None,
    signing: Annotated[
        bool,
        typer.Option(
            "--signing",
            help="An image-signing key pair in cosign's format: OUT.key (encrypted with "
            "$COSIGN_PASSWORD, or a prompted password) and OUT.pub. Implied by --type "
            "ecdsa-p256 or ed25519.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Generate a recipient key pair (PKCS#8, as skopeo needs) or, with --signing, an
    image-signing key pair that cosign reads."""
    prefix = out or out_option
    if prefix is None or (out is not None and out_option is not None):
        raise UsageError("name the output once: OUT or --out PREFIX")
    if signing or key_type in ("ecdsa-p256", "ed25519"):
        _generate_signing(prefix, key_type or "ecdsa-p256", force)
        return
    key_type = key_type or "ec-p256"
    if key_type not in KEY_TYPES:
        raise UsageError(f"--type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")
    private_path, public_path = prefix.with_suffix(".pem"), prefix.with_suffix(".pub")
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise UsageError(f"{path} exists; use --force to overwrite it")
    private_pem, public_pem = generate_key_pair(key_type)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    stdout.print(f"{private_path} {public_path} key id {key_id(public_pem, str(public_path))}")


def _generate_signing(prefix: Path, key_type: str, force: bool) -> None:
    if key_type not in SIGNING_KEY_TYPES:
        raise UsageError(
            f"--type {key_type!r} for a signing key: choose one of {', '.join(SIGNING_KEY_TYPES)}"
        )
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise UsageError(f"{path} exists; use --force to overwrite it")
    password = signing_password(confirm=True)
    key = generate_signing_key(key_type, str(private_path))
    atomic_write(private_path, encrypt_private_key(key, password), mode=0o600)
    atomic_write(public_path, key.public.public_pem())
    stdout.print(f"{private_path} {public_path} key id {key.public.key_id}")


def signing_password(confirm: bool = False) -> bytes:
    """$COSIGN_PASSWORD (as cosign reads it; may be empty), else a prompt on a terminal."""
    if (env := os.environ.get(PASSWORD_ENV)) is not None:
        return env.encode()
    if not sys.stdin.isatty():
        raise UsageError(f"no password for the signing key: set {PASSWORD_ENV}")
    text: str = typer.prompt(
        "Password for the signing key", hide_input=True, confirmation_prompt=confirm
    )
    return text.encode()


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
