"""A Docker Engine API request target, canonicalised strictly or refused.

The gateway decides on the path it parsed, and dockerd acts on the path it
parses; the two must never disagree. So this parser accepts only the plain
form the Docker clients send and refuses everything that another parser
might read differently:

- origin-form only (`/…`), ASCII, no control characters, no fragment;
- no percent-encoding at all in the path (names of containers, images,
  volumes and networks never need it), no backslash, no empty segment
  (`//`), no dot segment (`.`, `..`), no trailing slash;
- an optional version prefix `/vMAJOR.MINOR` with plain decimal numbers
  (`/v1.41/…`), at least 1.24; `/v1/…`, `/v1.41.0/…`, `/v01.41/…` and
  `/V1.41/…` are refused;
- a query of `key=value` pairs split on `&` only (Go refuses `;`), valid
  percent escapes, no control characters once decoded.

Anything not recognised raises `MalformedError`: the gateway denies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from trustplane.errors import MalformedError

MAX_TARGET = 8192
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE"})
MIN_API_VERSION = (1, 24)
"""Older versions took a HostConfig in the start call's body: refused."""

_VERSION = re.compile(r"/v(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,3})(?=/)")
# RFC 3986 pchar minus "%" (no encoding allowed) and minus ";" "," "=" "!" "$"
# "&" "'" "(" ")" "*" "+" (no Docker name uses them; Go and Python differ on some).
_SEGMENT = re.compile(r"[A-Za-z0-9._~:@-]+")
_QUERY_CHARS = re.compile(r"[A-Za-z0-9._~:@!$'()*+,;=/?%&-]*")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class Target:
    """A request target the gateway understood."""

    method: str
    version: str | None
    """`1.41` from `/v1.41/…`, None when unversioned."""
    path: str
    """Canonical path without the version prefix, e.g. `/containers/abc/start`."""
    segments: tuple[str, ...]
    query: dict[str, list[str]] = field(default_factory=dict)
    raw_query: str = ""

    def one(self, key: str) -> str | None:
        """The single value of `key`; a repeated key is ambiguous and refused."""
        values = self.query.get(key)
        if values is None:
            return None
        if len(values) != 1:
            raise MalformedError(f"query parameter {key!r} is repeated")
        return values[0]

    @property
    def upstream_target(self) -> str:
        """What is sent to dockerd: the canonical form of what was decided on."""
        prefix = f"/v{self.version}" if self.version is not None else ""
        query = f"?{self.raw_query}" if self.raw_query else ""
        return f"{prefix}{self.path}{query}"


def parse_target(method: str, target: str) -> Target:
    """Parse and canonicalise `target` for `method`, or raise MalformedError."""
    if method not in METHODS:
        raise MalformedError(f"method {method[:16]!r} is not allowed through the gateway")
    if not target.startswith("/") or len(target) > MAX_TARGET:
        raise MalformedError("the request target must be a path")
    if not target.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in target):
        raise MalformedError("the request target has non-ASCII or control characters")
    if "#" in target or "\\" in target:
        raise MalformedError("the request target has a fragment or a backslash")
    path, _, raw_query = target.partition("?")
    version: str | None = None
    match = _VERSION.match(path)
    if match is not None:
        version = f"{match.group(1)}.{match.group(2)}"
        if (int(match.group(1)), int(match.group(2))) < MIN_API_VERSION:
            raise MalformedError(f"API version {version} is older than the gateway accepts")
        path = path[match.end() :]
    elif re.match(r"/[vV][0-9.]", path):
        raise MalformedError("the API version prefix is malformed")
    if path == "/" or path.endswith("/"):
        raise MalformedError("the path is empty or ends with a slash")
    segments = tuple(path[1:].split("/"))
    for segment in segments:
        if segment in ("", ".", ".."):
            raise MalformedError("the path has an empty or dot segment")
        if _SEGMENT.fullmatch(segment) is None:
            raise MalformedError("the path has encoded or unexpected characters")
    return Target(method, version, path, segments, _parse_query(raw_query), raw_query)


def _parse_query(raw: str) -> dict[str, list[str]]:
    if not raw:
        return {}
    if _QUERY_CHARS.fullmatch(raw) is None or ";" in raw or _ESCAPE.search(raw):
        raise MalformedError("the query string is malformed")
    result: dict[str, list[str]] = {}
    for pair in raw.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        key_text = _decode(key)
        if not key_text:
            raise MalformedError("the query has an empty key")
        result.setdefault(key_text, []).append(_decode(value))
    return result


def _decode(text: str) -> str:
    try:
        decoded = unquote_plus(text, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise MalformedError("the query is not UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise MalformedError("the query has control characters")
    return decoded
