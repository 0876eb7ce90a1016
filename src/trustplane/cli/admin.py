"""`trustplane user | node | authorize`: principals and decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import emit_json, stdout
from trustplane.cli.session import Ca, Server, connect
from trustplane.errors import ExitCode, NotFoundError

user_app = typer.Typer(help="Users of the control plane.", no_args_is_help=True)
node_app = typer.Typer(help="Hosts and edge gateways.", no_args_is_help=True)


@user_app.command("create")
def create_user(
    name: str,
    role: Annotated[str, typer.Option(help="admin, operator or user.")] = "user",
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Create a user; prints the generated one-time password."""
    with connect(server, ca) as client:
        answer = client.create_user(name, role)
    stdout.print(f"user {answer['name']} ({answer['role']}) password: {answer['password']}")


@user_app.command("revoke")
def revoke_user(name: str, server: Server = None, ca: Ca = None) -> None:
    """Revoke every token NAME holds: refused everywhere, gateways included, within
    seconds. NAME can log in again."""
    with connect(server, ca) as client:
        answer = client.revoke(subject=f"user:{name}")
    stdout.print(f"revoked {answer['revoked']}")


@node_app.command("revoke")
def revoke_node(name: str, server: Server = None, ca: Ca = None) -> None:
    """Revoke every token node NAME holds (it can sign a new assertion for another)."""
    with connect(server, ca) as client:
        answer = client.revoke(subject=f"node:{name}")
    stdout.print(f"revoked {answer['revoked']}")


@node_app.command("register")
def register_node(
    name: str,
    public_key: Annotated[
        Path, typer.Option(help="PEM public key the node signs assertions with.")
    ],
    kind: Annotated[str, typer.Option(help="host or gateway.")] = "host",
    server: Server = None,
    ca: Ca = None,
) -> None:
    try:
        pem = public_key.read_text()
    except FileNotFoundError:
        raise NotFoundError(f"{public_key} does not exist") from None
    with connect(server, ca) as client:
        answer = client.register_node(name, kind, pem)
    stdout.print(f"node {answer['name']} ({answer['kind']}) key id {answer['key_id']}")


def authorize(
    action: str,
    resource: str,
    subject: Annotated[
        str | None, typer.Option(help="user:NAME or node:NAME (default: you).")
    ] = None,
    layer: Annotated[int | None, typer.Option(help="Image layer index, for tiered keys.")] = None,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Ask the policy: may SUBJECT do ACTION on RESOURCE? (The question is logged.)"""
    who = None
    if subject is not None:
        kind, _, name = subject.partition(":")
        who = (kind, name)
    with connect(server, ca) as client:
        answer = client.authorize(action, resource, who, layer)
    emit_json(answer)
    if answer["decision"] != "allow":
        raise typer.Exit(ExitCode.AUTH)  # denied: the same code as any refusal
