"""The proxy's shortcuts change no answer: a passed-on head, the header index, whole-head checks."""

from __future__ import annotations

import pytest

from trustplane.errors import MalformedError
from trustplane.gateway.http1 import parse_request_head, parse_response_head, response_framing
from trustplane.gateway.proxy import _passed_on, _response_head


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_plain_sized_answer_is_passed_on_as_it_came() -> None:
    data = head(
        "HTTP/1.1 200 OK",
        "Api-Version: 1.41",
        "Content-Type: application/json",
        "Date: Thu, 03 Dec 2026 11:00:00 GMT",
        "Content-Length: 3",
    )
    response = parse_response_head(data)
    framing = response_framing(response, "GET")
    assert _passed_on(response, data, framing) is data
    # The same head as the gateway would have built, but for the spelling.
    rebuilt = parse_response_head(_response_head(response, framing))
    assert rebuilt.headers == response.headers


@pytest.mark.parametrize(
    "lines",
    [
        ["HTTP/1.1 200 OK", "Connection: close", "Content-Length: 3"],
        ["HTTP/1.1 200 OK", "Keep-Alive: timeout=5", "Content-Length: 3"],
        ["HTTP/1.1 200 OK", "Transfer-Encoding: chunked"],
        ["HTTP/1.0 200 OK", "Content-Length: 3"],
        ["HTTP/1.1 204 No Content", "Content-Length: 0"],
        ["HTTP/1.1 200 OK", "Content-Type: text/plain"],  # until close
    ],
)
def test_anything_the_gateway_reframes_is_rebuilt(lines: list[str]) -> None:
    data = head(*lines)
    response = parse_response_head(data)
    framing = response_framing(response, "GET")
    passed = _passed_on(response, data, framing)
    assert passed is not data
    assert passed == _response_head(response, framing)


def test_a_repeated_content_length_is_refused_either_way() -> None:
    data = head("HTTP/1.1 200 OK", "Content-Length: 3", "Content-Length: 3")
    response = parse_response_head(data)
    framing = response_framing(response, "GET")
    with pytest.raises(MalformedError, match="repeated"):
        _passed_on(response, data, framing)


def test_the_header_index_answers_like_a_scan() -> None:
    parsed = parse_request_head(
        head("GET /_ping HTTP/1.1", "Host: d", "X-A: 1", "x-a: 2", "Connection: keep-alive, TE")
    )
    assert parsed.all("x-a") == ["1", "2"]
    parsed.all("x-a").append("3")  # a copy: the head stays as parsed
    assert parsed.all("x-a") == ["1", "2"]
    assert parsed.all("absent") == []
    assert parsed.tokens("connection") == {"keep-alive", "te"}
    with pytest.raises(MalformedError, match="repeated"):
        parsed.get("x-a")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"GET / HTTP/1.1\r\nHost: d\rX: y\r\n\r\n", "bare CR, LF or NUL"),
        (b"GET / HTTP/1.1\r\nHost: d\nX: y\r\n\r\n", "bare CR, LF or NUL"),
        (b"GET / HTTP/1.1\r\nHost: d\r\r\n\n\r\n\r\n", "bare CR, LF or NUL"),
        (b"GET / HTTP/1.1\r\nHost: d\x00\r\n\r\n", "bare CR, LF or NUL"),
        (b"GET / HTTP/1.1\r\nHost : d\r\n\r\n", "bad name"),
        (b"GET / HTTP/1.1\r\n Host: d\r\n\r\n", "bad name"),
        (b"GET / HTTP/1.1\r\nHost: d\x01\r\n\r\n", "control characters"),
        (b"GET / HTTP/1.1\r\nHost: d\x7f\r\n\r\n", "control characters"),
    ],
)
def test_whole_head_checks_refuse_as_the_line_checks_did(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedError, match=message):
        parse_request_head(raw)
