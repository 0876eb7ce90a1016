"""`trustplane key generate | id`: recipient key pairs for image encryption, and
image-signing key pairs in cosign's format."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from trustplane.atomic import atomic_write_all
from trustplane.cli.common import output_file, read_file, stdout
from trustplane.crypto.keys import KEY_TYPES, generate_key_pair, key_id
from trustplane.crypto.signing import (
    SIGNING_KEY_TYPES,
    encrypt_private_key,
    generate_signing_key,
)
from trustplane.errors import UsageError, from_os_error

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
    label = "OUT" if out is not None else "--out"
    if prefix.is_dir():  # OUT.pem would land beside it, not in it
        raise UsageError(f"{label} {prefix} is a directory; give a path prefix, as {prefix}/alice")
    if signing or key_type in ("ecdsa-p256", "ed25519"):
        _generate_signing(prefix, key_type or "ecdsa-p256", force, label)
        return
    key_type = key_type or "ec-p256"
    if key_type not in KEY_TYPES:
        raise UsageError(f"--type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")
    private_path, public_path = prefix.with_suffix(".pem"), prefix.with_suffix(".pub")
    _check_outputs(private_path, public_path, force, label)
    private_pem, public_pem = generate_key_pair(key_type)
    _write_pair((private_path, private_pem), (public_path, public_pem))
    stdout.print(f"{private_path} {public_path} key id {key_id(public_pem, str(public_path))}")


def _generate_signing(prefix: Path, key_type: str, force: bool, label: str) -> None:
    if key_type not in SIGNING_KEY_TYPES:
        raise UsageError(
            f"--type {key_type!r} for a signing key: choose one of {', '.join(SIGNING_KEY_TYPES)}"
        )
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    _check_outputs(private_path, public_path, force, label)
    password = signing_password(confirm=True)
    key = generate_signing_key(key_type, str(private_path))
    _write_pair(
        (private_path, encrypt_private_key(key, password)), (public_path, key.public.public_pem())
    )
    stdout.print(f"{private_path} {public_path} key id {key.public.key_id}")


def _check_outputs(private_path: Path, public_path: Path, force: bool, label: str) -> None:
    for path in (private_path, public_path):
        output_file(path, label)
        if path.exists() and not force:
            raise UsageError(f"{path} exists; use --force to overwrite it")


def _write_pair(private: tuple[Path, bytes], public: tuple[Path, bytes]) -> None:
    """Both files or neither, so a full disk or an interruption never leaves half a
    pair (or, with --force, an old public key beside a new private key)."""
    try:
        atomic_write_all([(*private, 0o600), (*public, 0o644)])
    except OSError as exc:  # a full disk, a read-only directory: name the file
        raise from_os_error(exc) or exc from None


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
    stdout.print(key_id(read_file(path), str(path)))
