"""Where the CLI keeps its login: server URL, CA, token (mode 0600).

`$TRUSTPLANE_SESSION` names the file (default ~/.config/trustplane/session.json),
so tests and scripts can keep separate identities.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

from trustplane.atomic import atomic_write
from trustplane.client import ControlClient
from trustplane.errors import AuthError, MalformedError, UsageError


def url_checker(option: str) -> Callable[[str | None], str | None]:
    """A parser callback: `option` must be an http(s) URL, so that `host:port` is
    a usage error here rather than the HTTP library's words later."""

    def check(url: str | None) -> str | None:
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
            raise UsageError(f"{option} {url!r}: give the control plane's URL, https://HOST:PORT")
        return url

    return check


Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Control plane URL (default: from trustplane login).",
        callback=url_checker("--server"),
    ),
]
ServerUrl = Annotated[
    str, typer.Option("--server", help="Control plane URL.", callback=url_checker("--server"))
]
Ca = Annotated[Path | None, typer.Option("--ca", help="CA certificate of the control plane.")]


@dataclass
class Session:
    server: str
    ca_file: str | None
    token: str
    expires: float
    subject: str


def session_path() -> Path:
    if env := os.environ.get("TRUSTPLANE_SESSION"):
        return Path(env)
    return Path.home() / ".config" / "trustplane" / "session.json"


def save(session: Session) -> None:
    path = session_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(asdict(session)).encode(), mode=0o600)


def load() -> Session | None:
    path = session_path()
    if not path.exists():
        return None
    try:
        return Session(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        raise MalformedError(f"{path}: not a trustplane session; log in again") from None


def connect(server: str | None = None, ca: Path | None = None) -> ControlClient:
    """A client for `server` (or the logged-in one), with the session's token if it fits."""
    session = load()
    url = server or (session.server if session else None)
    if url is None:
        raise UsageError("no control plane: give --server, or run trustplane login first")
    token = None
    ca_file = ca
    if session is not None and session.server.rstrip("/") == url.rstrip("/"):
        ca_file = ca_file or (Path(session.ca_file) if session.ca_file else None)
        if session.expires < time.time():
            raise AuthError(f"the login to {url} has expired; run trustplane login again")
        token = session.token
    return ControlClient(url, ca_file, token)
