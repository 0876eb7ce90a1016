"""What every command shares: options for reaching registries, key files,
and the one-line error contract."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from trustplane.crypto.keys import UnwrapKey, load_unwrap_key
from trustplane.errors import NotFoundError, UsageError
from trustplane.oci.credentials import Credentials
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
    typer.Option(help="Upload blobs in PATCH chunks of this many MiB (default: one PUT)."),
]


def endpoint(
    tls_verify: bool,
    ca_file: Path | None,
    creds: str | None,
    authfile: Path | None,
    chunk_mib: int | None = None,
) -> Endpoint:
    if chunk_mib is not None and chunk_mib <= 0:
        raise UsageError("--dest-chunk-size must be a positive number of MiB")
    if ca_file is not None and not ca_file.is_file():
        raise NotFoundError(f"CA bundle {ca_file} does not exist")
    return Endpoint(
        tls_verify=tls_verify,
        ca_file=ca_file,
        credentials=Credentials.parse(creds) if creds else None,
        authfile=authfile,
        chunk_size=chunk_mib << 20 if chunk_mib else None,
    )


def load_keys(paths: list[Path], passphrase_file: Path | None) -> list[UnwrapKey]:
    password = None
    if passphrase_file is not None:
        password = _read(passphrase_file).rstrip(b"\r\n")
    return [load_unwrap_key(_read(path), str(path), password) for path in paths]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except OSError as exc:
        raise NotFoundError(f"cannot read {path}: {exc.strerror}") from None


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
