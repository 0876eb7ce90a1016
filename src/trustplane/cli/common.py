"""What every command shares: options for reaching registries, key files,
and the one-line error contract."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console

from trustplane.ca_bundle import client_context
from trustplane.crypto.keys import UnwrapKey, load_unwrap_key
from trustplane.errors import (
    MalformedError,
    TrustplaneError,
    UsageError,
    from_os_error,
    missing,
)
from trustplane.oci.credentials import Credentials, lookup_credentials
from trustplane.oci.transport import Endpoint

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Platform = Annotated[
    # Help text is rich markup: the backslash keeps "[/variant]" from being a closing tag.
    str | None, typer.Option(help="os/arch\\[/variant] to pick from a multi-platform index.")
]
AuthFile = Annotated[
    Path | None, typer.Option(help="Registry auth file (containers auth.json or Docker config).")
]
SrcTlsVerify = Annotated[
    bool, typer.Option("--src-tls-verify/--no-src-tls-verify", help="Verify the source's TLS.")
]
DestTlsVerify = Annotated[
    bool,
    typer.Option("--dest-tls-verify/--no-dest-tls-verify", help="Verify the destination's TLS."),
]
SrcCaCert = Annotated[Path | None, typer.Option(help="CA bundle for the source registry.")]
DestCaCert = Annotated[Path | None, typer.Option(help="CA bundle for the destination registry.")]
SrcCreds = Annotated[str | None, typer.Option(help="USER:PASSWORD for the source registry.")]
DestCreds = Annotated[str | None, typer.Option(help="USER:PASSWORD for the destination registry.")]
ChunkSize = Annotated[
    int | None,
    typer.Option(
        help="Upload blobs in PATCH chunks of this many MiB (default: one streamed upload)."
    ),
]


def endpoint(
    tls_verify: bool,
    ca_file: Path | None,
    creds: str | None,
    authfile: Path | None,
    chunk_mib: int | None = None,
    *,
    side: str = "",
) -> Endpoint:
    """How to reach one registry side, checked before any work starts.

    `side` is the options' prefix ("src-", "dest-" or "") so that an error
    names the option the user typed.
    """
    if chunk_mib is not None and chunk_mib <= 0:
        raise UsageError(f"--{side}chunk-size must be a positive number of MiB")
    if ca_file is not None and tls_verify:
        client_context(ca_file, f"--{side}cacert")  # a missing or non-PEM bundle fails here
    elif ca_file is not None:
        input_file(ca_file, f"--{side}cacert")
    credentials = None
    if creds is not None:
        try:
            credentials = Credentials.parse(creds)
        except MalformedError:
            raise UsageError(f"--{side}creds: give USER:PASSWORD") from None
    if authfile is not None:
        input_file(authfile, "--authfile")
        lookup_credentials("", [authfile])  # parsed now: a broken file fails before any work
    return Endpoint(
        tls_verify=tls_verify,
        ca_file=ca_file,
        credentials=credentials,
        authfile=authfile,
        chunk_size=chunk_mib << 20 if chunk_mib else None,
    )


def load_keys(paths: list[Path], passphrase_file: Path | None) -> list[UnwrapKey]:
    password = None
    if passphrase_file is not None:
        password = read_file(passphrase_file, "--key-passphrase-file").rstrip(b"\r\n")
    return [load_unwrap_key(read_file(path, "--key"), str(path), password) for path in paths]


def read_file(path: Path, option: str | None = None) -> bytes:
    """The bytes of a file the user named; a missing or unreadable one is one clear error."""
    try:
        return path.read_bytes()
    except OSError as exc:
        expected = from_os_error(exc, path)
        if expected is None:
            raise
        raise _named(expected, option) from None


def input_file(path: Path, option: str) -> Path:
    """`path` must be an existing file (not a directory)."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file")
    if not path.exists():
        raise _named(missing(path), option)
    return path


def output_file(path: Path, option: str) -> Path:
    """`path` can be written: not a directory, and its directory exists."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise _named(missing(path), option)
    return path


def state_directory(path: Path, option: str) -> Path:
    """`path` is a directory, or nothing yet (it will be made)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} exists and is not a directory")
    return path


def _named(error: TrustplaneError, option: str | None) -> TrustplaneError:
    """The same error, its message led by the option that named the file."""
    return type(error)(f"{option} {error}") if option else error


def emit_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
