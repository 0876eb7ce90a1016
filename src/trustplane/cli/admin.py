"""`trustplane user | node | authorize`: principals and decisions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import typer

from trustplane.cli.common import emit_json, read_file, stdout
from trustplane.cli.session import Ca, Server, connect
from trustplane.errors import Forbidden, UsageError

user_app = typer.Typer(help="Users of the control plane.", no_args_is_help=True)
node_app = typer.Typer(help="Hosts and edge gateways.", no_args_is_help=True)


# The values the server accepts (trustplane/api/identity.py), checked here so
# that a wrong one is a usage error naming the option, before any request.
Role = Literal["admin", "operator", "user"]
NodeKind = Literal["host", "gateway"]
NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}")
Name = Annotated[str, typer.Argument(help="Letters, digits, '.', '_' and '-'; 128 at most.")]


def check_name(name: str, what: str) -> str:
    if not NAME.fullmatch(name):
        raise UsageError(
            f"{what} name {name!r}: use letters, digits, '.', '_' and '-' (128 at most), "
            "starting with a letter or digit"
        )
    return name


@user_app.command("create")
def create_user(
    name: Name,
    role: Annotated[Role, typer.Option(help="What the user may do.")] = "user",
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Create a user; prints the generated one-time password."""
    check_name(name, "user")
    with connect(server, ca) as client:
        answer = client.create_user(name, role)
    stdout.print(f"user {answer.name} ({answer.role}) password: {answer.password}")


@user_app.command("revoke")
def revoke_user(name: Name, server: Server = None, ca: Ca = None) -> None:
    """Revoke every token NAME holds: refused everywhere, gateways included, within
    seconds. NAME can log in again."""
    check_name(name, "user")
    with connect(server, ca) as client:
        answer = client.revoke(subject=f"user:{name}")
    stdout.print(f"revoked {answer.revoked}")


@node_app.command("revoke")
def revoke_node(name: Name, server: Server = None, ca: Ca = None) -> None:
    """Revoke every token node NAME holds (it can sign a new assertion for another)."""
    check_name(name, "node")
    with connect(server, ca) as client:
        answer = client.revoke(subject=f"node:{name}")
    stdout.print(f"revoked {answer.revoked}")


@node_app.command("register")
def register_node(
    name: Name,
    public_key: Annotated[
        Path, typer.Option(help="PEM public key the node signs assertions with.")
    ],
    kind: Annotated[NodeKind, typer.Option(help="A host, or an edge gateway.")] = "host",
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Register a node by the public key it signs its token requests with."""
    check_name(name, "node")
    pem = read_file(public_key, "--public-key").decode()
    with connect(server, ca) as client:
        answer = client.register_node(name, kind, pem)
    stdout.print(f"node {answer.name} ({answer.kind}) key id {answer.key_id}")


@node_app.command("clear")
def clear_node(
    name: str,
    reason: Annotated[str, typer.Option(help="Why the node may attest again (goes into the log).")],
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Lift a node's quarantine after a measurement failure (administrators; logged).

    The node's next quote must pass again; the events its TPM logged in the
    current boot count as reviewed. A node whose log no longer explains its
    PCR (evidence lost) attests again only after a reboot.
    """
    with connect(server, ca) as client:
        answer = client.clear_node(name, reason)
    stdout.print(
        f"node {answer.node} cleared (was quarantined: {answer.quarantine}); "
        f"{answer.reviewed_events} events of its current boot reviewed; "
        f"log entry {answer.log_index}"
    )


def authorize(
    action: str,
    resource: str,
    subject: Annotated[
        str | None, typer.Option(help="user:NAME or node:NAME (default: you).")
    ] = None,
    layer: Annotated[
        int | None, typer.Option(min=0, help="Image layer index, for tiered keys.")
    ] = None,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Ask the policy: may SUBJECT do ACTION on RESOURCE? (The question is logged.)

    Prints the decision as JSON; a denial is also exit 4 and one line on stderr.
    """
    who: tuple[str, str] | None = None
    if subject is not None:
        kind, _, name = subject.partition(":")
        if kind not in ("user", "node") or not name:
            raise UsageError(f"--subject {subject!r}: give user:NAME or node:NAME")
        who = (kind, check_name(name, kind))
    with connect(server, ca) as client:
        answer = client.authorize(action, resource, who, layer)
    emit_json(answer)
    if not answer.allowed:  # the same code as any refusal
        raise Forbidden(f"denied: {answer.reason} (log entry {answer.log_index})")
