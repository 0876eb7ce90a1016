"""The strict HTTP/1.1 subset: what passes, and each refusal."""

from __future__ import annotations

import asyncio

import pytest

from trustplane.errors import MalformedError
from trustplane.gateway.http1 import (
    Framing,
    check_content_type,
    chunk,
    parse_request_head,
    parse_response_head,
    read_body,
    request_framing,
    response_framing,
)


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def body_of(data: bytes, framing: Framing) -> bytes:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return b"".join([piece async for piece in read_body(reader, framing)])


def test_a_docker_cli_request_parses() -> None:
    parsed = parse_request_head(
        head(
            "POST /v1.41/containers/create?name=x HTTP/1.1",
            "Host: api.moby.localhost",
            "User-Agent: Docker-Client/28.2.2 (linux)",
            "Content-Length: 2",
            "Content-Type: application/json",
            "X-Trustplane-Token: abc",
        )
    )
    assert parsed.start == ("POST", "/v1.41/containers/create?name=x", "HTTP/1.1")
    assert parsed.all("x-trustplane-token") == ["abc"]
    assert request_framing(parsed) == Framing(length=2)


@pytest.mark.parametrize(
    "lines",
    [
        ("POST / HTTP/1.1", "Host: d", "Content-Length: 1", "Transfer-Encoding: chunked"),
        ("POST / HTTP/1.1", "Host: d", "Content-Length: 1", "Content-Length: 1"),
        ("POST / HTTP/1.1", "Host: d", "Content-Length: 1, 1"),
        ("POST / HTTP/1.1", "Host: d", "Content-Length: +1"),
        ("POST / HTTP/1.1", "Host: d", "Transfer-Encoding: gzip, chunked"),
        ("POST / HTTP/1.1", "Host: d", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
        ("POST / HTTP/1.0", "Transfer-Encoding: chunked"),
    ],
)
def test_ambiguous_framing_is_refused(lines: tuple[str, ...]) -> None:
    with pytest.raises(MalformedError):
        request_framing(parse_request_head(head(*lines)))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: d\nX: y\r\n\r\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: d\r\n folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost : d\r\n\r\n",  # space before the colon
        b"GET / HTTP/1.1\r\nHost: d\r\nHost: e\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET  / HTTP/1.1\r\nHost: d\r\n\r\n",
        b"GET http://x/ HTTP/1.1\r\nHost: d\r\n\r\n",
        b"get / HTTP/1.1\r\nHost: d\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: d\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: d\x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: \x01\r\nHost: d\r\n\r\n",
    ],
)
def test_malformed_heads_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedError):
        parse_request_head(data)


def test_chunked_bodies_decode_and_refuse_extensions_and_trailers() -> None:
    encoded = chunk(b"hello ") + chunk(b"world") + chunk(b"")
    assert asyncio.run(body_of(encoded, Framing(chunked=True))) == b"hello world"
    for bad in (
        b"5;x=1\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"5\r\nhel",
    ):
        with pytest.raises(MalformedError):
            asyncio.run(body_of(bad, Framing(chunked=True)))


def test_response_framing() -> None:
    ok = parse_response_head(head("HTTP/1.1 200 OK", "Content-Length: 5"))
    assert response_framing(ok, "GET") == Framing(length=5)
    assert response_framing(ok, "HEAD") == Framing(length=0)
    chunked = parse_response_head(head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"))
    assert response_framing(chunked, "GET") == Framing(chunked=True)
    stream = parse_response_head(head("HTTP/1.1 200 OK", "Content-Type: application/json"))
    assert response_framing(stream, "GET") == Framing(until_close=True)
    empty = parse_response_head(head("HTTP/1.1 204 No Content"))
    assert response_framing(empty, "POST") == Framing(length=0)
    with pytest.raises(MalformedError):
        parse_response_head(head("HTTP/1.1 2000 OK"))


@pytest.mark.parametrize(
    "value",
    [
        "application/x-www-form-urlencoded",
        "Application/X-WWW-Form-Urlencoded; charset=utf-8",
        "multipart/form-data; boundary=x",
    ],
)
def test_form_bodies_are_refused(value: str) -> None:
    """Go's ParseForm would read `networkmode=host` from such a body as a parameter."""
    parsed = parse_request_head(head("POST /build HTTP/1.1", "Host: d", f"Content-Type: {value}"))
    with pytest.raises(MalformedError):
        check_content_type(parsed)
    twice = head("POST /build HTTP/1.1", "Host: d", "Content-Type: a/b", "Content-Type: c/d")
    with pytest.raises(MalformedError):
        check_content_type(parse_request_head(twice))
    check_content_type(parse_request_head(head("POST /build HTTP/1.1", "Host: d")))
