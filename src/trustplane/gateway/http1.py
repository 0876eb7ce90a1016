"""A strict HTTP/1.1 subset: what the Docker clients send, nothing looser.

Why not h11 (which the project has through httpx): the gateway must hand a
connection over to raw byte piping after Docker's *old* hijack (a 200
response with `application/vnd.docker.raw-stream`, no 101), which h11 cannot
do without reaching into its private buffer, and it merges repeated
identical `Content-Length` headers where this gateway refuses them. The
subset here is small and every rule is a refusal:

- request line `METHOD SP origin-form SP HTTP/1.1` (or HTTP/1.0), CRLF only;
- header names are RFC 9110 tokens, no whitespace before the colon, no
  obs-fold, no control characters in values, at most 100 headers, 64 KiB;
- exactly one `Host`; `Content-Length` at most once and plain digits;
  `Transfer-Encoding` at most once and exactly `chunked`; both together is
  request smuggling and refused; chunk sizes are plain hex, no extensions,
  no trailers.

Every refusal is a `MalformedError`; the proxy answers 400 and closes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from trustplane.errors import MalformedError

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
MAX_CHUNK_LINE = 64
READ_SIZE = 64 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_METHOD = re.compile(rb"[A-Z]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([\t\x20-\x7e\x80-\xff]*)")
"""A whole header line at once: the fast path of the two checks in `_header`."""


@dataclass(frozen=True)
class Head:
    """A request or response head; header names in lower case, in order."""

    start: tuple[str, str, str]
    headers: tuple[tuple[str, str], ...]
    index: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)
    """name -> values, built once: a request asks for a dozen headers by name."""

    def __post_init__(self) -> None:
        if self.headers and not self.index:
            index: dict[str, list[str]] = {}
            for key, value in self.headers:
                index.setdefault(key, []).append(value)
            object.__setattr__(self, "index", index)

    def all(self, name: str) -> list[str]:
        return list(self.index.get(name, ()))

    def get(self, name: str) -> str | None:
        values = self.all(name)
        if len(values) > 1:
            raise MalformedError(f"header {name} is repeated")
        return values[0] if values else None

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of every `name` header, in lower case."""
        return {
            token.strip().lower()
            for value in self.all(name)
            for token in value.split(",")
            if token.strip()
        }


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The bytes of one head up to and including CRLFCRLF; None on a clean EOF."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise MalformedError("the connection closed inside a message head") from None
    except asyncio.LimitOverrunError:
        raise MalformedError("the message head is too large") from None
    if len(data) > MAX_HEAD:
        raise MalformedError("the message head is too large")
    return data


def parse_request_head(data: bytes) -> Head:
    lines = _lines(data)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or _METHOD.fullmatch(parts[0]) is None:
        raise MalformedError("the request line is malformed")
    if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise MalformedError("only HTTP/1.1 and HTTP/1.0 are accepted")
    if not parts[1].startswith(b"/"):
        raise MalformedError("the request target must be a path")
    head = Head(
        (parts[0].decode(), parts[1].decode("latin-1"), parts[2].decode()), _headers(lines[1:])
    )
    hosts = head.all("host")
    if len(hosts) > 1 or (not hosts and parts[2] == b"HTTP/1.1"):
        raise MalformedError("a request needs exactly one Host header")
    return head


def check_content_type(head: Head) -> None:
    """Refuse form bodies: Go's ParseForm (dockerd) reads their fields as query parameters.

    A urlencoded body would let `networkmode=host` (or `fromImage=…`) reach
    dockerd unseen by a gateway that reads the query; the Engine API never
    takes a form, so any form content type, or a repeated Content-Type, is
    refused.
    """
    value = (head.get("content-type") or "").lower()
    if "form-urlencoded" in value or "multipart/" in value:
        raise MalformedError("form bodies are not accepted (the Engine API takes none)")


def parse_response_head(data: bytes) -> Head:
    lines = _lines(data)
    version, _, rest = lines[0].partition(b" ")
    status, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or re.fullmatch(rb"[1-5][0-9]{2}", status) is None:
        raise MalformedError("dockerd sent a malformed status line")
    return Head((version.decode(), status.decode(), reason.decode("latin-1")), _headers(lines[1:]))


def _lines(data: bytes) -> list[bytes]:
    if not data.endswith(b"\r\n\r\n"):
        raise MalformedError("the message head does not end with CRLF CRLF")
    body = data[:-4]
    # A CR or LF outside a CRLF pair is one that a split on CRLF leaves in a
    # line: counting the three in C is the same check as scanning each line.
    pairs = body.count(b"\r\n")
    if b"\x00" in body or body.count(b"\r") != pairs or body.count(b"\n") != pairs:
        raise MalformedError("the message head has a bare CR, LF or NUL")
    if pairs > MAX_HEADERS:
        raise MalformedError("the message has too many headers")
    return body.split(b"\r\n")


def _headers(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    headers = []
    for line in lines:
        match = _HEADER.fullmatch(line)
        if match is None:
            _header(line)  # says which rule the line breaks
            raise MalformedError("a header line is malformed")
        headers.append((match[1].decode("ascii").lower(), match[2].strip(b" \t").decode("latin-1")))
    return tuple(headers)


def _header(line: bytes) -> None:
    """The header rules one at a time, for the refusal's message."""
    name, colon, value = line.partition(b":")
    if not colon or _TOKEN.fullmatch(name) is None:
        raise MalformedError("a header line is malformed (folded, or a bad name)")
    if _VALUE.fullmatch(value.strip(b" \t")) is None:
        raise MalformedError("a header value has control characters")


@dataclass(frozen=True)
class Framing:
    """How a body is delimited: a length, chunked, or (responses only) the close."""

    length: int | None = None
    chunked: bool = False
    until_close: bool = False


def request_framing(head: Head) -> Framing:
    lengths = head.all("content-length")
    encodings = head.all("transfer-encoding")
    if lengths and encodings:
        raise MalformedError("Content-Length with Transfer-Encoding (request smuggling)")
    if len(lengths) > 1 or len(encodings) > 1:
        raise MalformedError("Content-Length or Transfer-Encoding is repeated")
    if encodings:
        if encodings[0].strip().lower() != "chunked" or head.start[2] != "HTTP/1.1":
            raise MalformedError("only Transfer-Encoding: chunked (HTTP/1.1) is accepted")
        return Framing(chunked=True)
    if lengths:
        if _DIGITS.fullmatch(lengths[0].encode()) is None:
            raise MalformedError("Content-Length is not a plain number")
        return Framing(length=int(lengths[0]))
    return Framing(length=0)


def response_framing(head: Head, request_method: str) -> Framing:
    status = int(head.start[1])
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return Framing(length=0)
    encodings = head.all("transfer-encoding")
    lengths = head.all("content-length")
    if encodings:
        if len(encodings) != 1 or encodings[0].strip().lower() != "chunked" or lengths:
            raise MalformedError("dockerd sent an unexpected Transfer-Encoding")
        return Framing(chunked=True)
    if lengths:
        if len(set(lengths)) != 1 or _DIGITS.fullmatch(lengths[0].encode()) is None:
            raise MalformedError("dockerd sent a malformed Content-Length")
        return Framing(length=int(lengths[0]))
    return Framing(until_close=True)


async def read_body(reader: asyncio.StreamReader, framing: Framing) -> AsyncIterator[bytes]:
    """The decoded body, piece by piece as it arrives (memory stays flat)."""
    if framing.chunked:
        while True:
            line = await _chunk_line(reader)
            if _HEX.fullmatch(line) is None:
                raise MalformedError("a chunk size is malformed")
            size = int(line, 16)
            if size == 0:
                if await _chunk_line(reader) != b"":
                    raise MalformedError("chunked trailers are not accepted")
                return
            while size:
                piece = await reader.read(min(size, READ_SIZE))
                if not piece:
                    raise MalformedError("the connection closed inside a chunk")
                size -= len(piece)
                yield piece
            if await reader.readexactly(2) != b"\r\n":
                raise MalformedError("a chunk does not end with CRLF")
    elif framing.until_close:
        while piece := await reader.read(READ_SIZE):
            yield piece
    else:
        left = framing.length or 0
        while left:
            piece = await reader.read(min(left, READ_SIZE))
            if not piece:
                raise MalformedError("the connection closed inside a body")
            left -= len(piece)
            yield piece


async def _chunk_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise MalformedError("a chunk line is malformed or cut short") from None
    if len(line) > MAX_CHUNK_LINE:
        raise MalformedError("a chunk line is too long")
    return line[:-2]


def chunk(data: bytes) -> bytes:
    """One chunk of chunked transfer coding; b"" makes the last chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n"


def serialize_head(start: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [start, *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
