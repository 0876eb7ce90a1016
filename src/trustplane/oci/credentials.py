"""Registry credentials and where they are found.

In order: what the command line gives, the auth file named by `--authfile`
or `$REGISTRY_AUTH_FILE`, containers' `auth.json`, and Docker's
`~/.docker/config.json` (`auths.HOST.auth` = base64 "user:pass").
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trustplane.errors import MalformedError


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    @classmethod
    def parse(cls, text: str) -> Credentials:
        username, sep, password = text.partition(":")
        if not sep or not username:
            raise MalformedError("credentials must be USER:PASSWORD")
        return cls(username, password)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def auth_files(explicit: Path | None = None) -> list[Path]:
    candidates = []
    if explicit is not None:
        candidates.append(explicit)
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        candidates.append(Path(env))
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(runtime) / "containers" / "auth.json")
    candidates.append(Path.home() / ".docker" / "config.json")
    return candidates


def lookup_credentials(host: str, files: Iterable[Path]) -> Credentials | None:
    """The first stored credentials for `host`; unreadable files are errors."""
    for path in files:
        if not path.is_file():
            continue
        try:
            auths = json.loads(path.read_text()).get("auths", {})
            if not isinstance(auths, dict):
                raise ValueError("auths is not an object")
        except (OSError, ValueError, AttributeError):
            raise MalformedError(f"{path}: not a valid auth file") from None
        for key in (host, f"https://{host}", f"http://{host}"):
            entry = auths.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                try:
                    return Credentials.parse(base64.b64decode(entry["auth"]).decode())
                except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII input
                    raise MalformedError(f"{path}: credentials for {host} are not base64") from None
    return None
