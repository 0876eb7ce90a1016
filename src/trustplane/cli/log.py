"""`trustplane log verify | show`: hold the transparency log to its word.

The client keeps the last checkpoint it verified (per server, in a state
file) and pins the log's key on first use. Each run checks the new signed
checkpoint, proves it consistent with the kept one, and optionally proves
that an entry is included. A log whose history was rewritten fails here.
With `--audit` it is a monitor: it fetches every entry, recomputes the tree
and holds it to the checkpoint (trust/log_audit.py), so a stored entry that
was altered behind the tree's back is found and named too.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from trustplane.atomic import atomic_write
from trustplane.cli.common import stdout
from trustplane.cli.session import Ca, Server, connect
from trustplane.client import ControlClient
from trustplane.errors import IntegrityError, MalformedError
from trustplane.trust import log_audit, merkle
from trustplane.trust.checkpoint import open_checkpoint
from trustplane.trust.note import parse_verifier_key

app = typer.Typer(help="Verify the transparency log.", no_args_is_help=True)
State = Annotated[
    Path | None,
    typer.Option(
        help="Where verified checkpoints are kept (default ~/.config/trustplane/log-state.json)."
    ),
]


def state_path(given: Path | None) -> Path:
    if given is not None:
        return given
    if env := os.environ.get("TRUSTPLANE_LOG_STATE"):
        return Path(env)
    return Path.home() / ".config" / "trustplane" / "log-state.json"


@app.command()
def verify(
    entry: Annotated[
        list[int] | None, typer.Option(min=0, help="Also prove that entry N is included.")
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="The log's verifier key (default: pinned on first use).")
    ] = None,
    audit: Annotated[
        bool,
        typer.Option(
            "--audit",
            help="Also fetch every entry, recompute the tree and compare it with the signed "
            "checkpoint (a monitor); names the first entry that does not fit.",
        ),
    ] = False,
    state: State = None,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Check the signed checkpoint, its consistency with the last one seen, and inclusions."""
    with connect(server, ca) as client:
        lines, _ = check_log(client, state_path(state), key, entry or [], audit=audit)
    for line in lines:
        stdout.print(line)


def check_log(
    client: ControlClient,
    path: Path,
    key: str | None,
    entries: list[int],
    *,
    audit: bool = False,
) -> tuple[list[str], dict[int, bytes]]:
    """Verify the signed checkpoint (key pinned in `path` on first use), its
    consistency with the one verified before, that each of `entries` is
    included, and (`audit`) every entry; keep the new checkpoint only when
    all of it holds. Returns what was shown and the entries' bodies, proven
    to be in the tree. Any failure: IntegrityError."""
    known: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    remembered = known.get(client.url, {})
    published = client.log_key()
    verifier_text = key or remembered.get("verifier_key") or published.verifier_key
    if remembered.get("verifier_key") and published.verifier_key != remembered["verifier_key"]:
        raise IntegrityError("the log's signing key changed since it was pinned")
    verifier = parse_verifier_key(verifier_text)
    checkpoint = open_checkpoint(client.checkpoint(), verifier, published.origin)
    lines = [
        f"checkpoint: {checkpoint.size} entries, root {checkpoint.root.hex()}, signature valid"
    ]
    old_size = int(remembered.get("size", 0))
    old_root = base64.b64decode(remembered["root"]) if "root" in remembered else None
    if old_root is not None:
        if checkpoint.size < old_size:
            raise IntegrityError(f"the log shrank from {old_size} to {checkpoint.size} entries")
        if checkpoint.size == old_size:
            if checkpoint.root != old_root:
                raise IntegrityError("same size, different root: the log's history was rewritten")
        elif old_size > 0:
            proof = client.consistency_proof(old_size, checkpoint.size)
            if not merkle.verify_consistency(
                old_size, checkpoint.size, old_root, checkpoint.root, proof
            ):
                raise IntegrityError(
                    f"the log at {checkpoint.size} is not an extension of the one verified at "
                    f"{old_size}: its history was rewritten"
                )
        lines.append(f"consistent with the checkpoint verified before ({old_size} entries)")
    bodies: dict[int, bytes] = {}
    for index in entries:
        body = client.log_entry(index)
        proof = client.inclusion_proof(index, checkpoint.size)
        if not merkle.verify_inclusion(
            merkle.leaf_hash(body), index, checkpoint.size, proof, checkpoint.root
        ):
            raise IntegrityError(
                f"entry {index} is not included in the signed tree: it was altered"
            )
        bodies[index] = body
        lines.append(f"entry {index} included: {body.decode(errors='replace')}")
    if audit:
        seen = (old_size, old_root) if old_root is not None else None
        lines.append(audit_entries(client, checkpoint.size, checkpoint.root, seen))
    known[client.url] = {
        "verifier_key": verifier_text,
        "size": checkpoint.size,
        "root": base64.b64encode(checkpoint.root).decode(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(known, indent=2).encode(), mode=0o600)
    return lines, bodies


def audit_entries(
    client: ControlClient, size: int, root: bytes, seen: tuple[int, bytes] | None
) -> str:
    """Fetch entries [0, size), recompute the tree, hold it to `root` (signed)
    and to `seen` (verified before); IntegrityError naming what does not fit."""
    started = time.monotonic()
    console = Console(stderr=True)
    with Progress(  # on a terminal only, and gone when done: stderr keeps one error line
        TextColumn("[bold]auditing the log"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=size < _AUDIT_BAR or not console.is_terminal,
    ) as progress:
        task = progress.add_task("entries", total=size)
        result = log_audit.audit(
            size,
            root,
            client.log_entries,
            client.consistency_proof,
            known=seen,
            progress=lambda done: progress.update(task, completed=done),
        )
    if result.finding is not None:
        raise IntegrityError(f"audit: {result.finding.reason}")
    elapsed = max(time.monotonic() - started, 1e-9)
    return (
        f"audit: {size} entries fetched and hashed; the tree they make is the signed one "
        f"({size / elapsed:,.0f} entries/s)"
    )


_AUDIT_BAR = 100_000
"""Logs smaller than this audit in about a second: no bar."""


@app.command()
def show(
    index: Annotated[int, typer.Argument(min=0, help="Entry number.")],
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Print one entry of the log."""
    with connect(server, ca) as client:
        body = client.log_entry(index)
    try:
        stdout.print_json(body.decode())
    except (UnicodeDecodeError, ValueError):
        raise MalformedError(f"entry {index} is not JSON") from None
