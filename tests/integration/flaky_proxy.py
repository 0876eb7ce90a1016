"""A small, deliberately unreliable HTTP proxy for the registry client tests.

It sits in front of a plain-HTTP registry on 127.0.0.1 and forwards every
request unchanged (the Host header included, so the Locations the registry
builds point back at the proxy), except those that match a `Fault`: those get
a 503, a dropped connection (before anything reaches the registry, or after
half of the request body has), or a rewritten response body. A chunked
request body (a streamed upload) is read whole and forwarded with its length. Every exchange
is recorded with the number of request-body bytes that reached the registry,
so a test can tell a resumed upload from a restarted one.

stdlib only (ThreadingHTTPServer + http.client): one process, one thread per
connection, nothing to install.
"""

from __future__ import annotations

import http.client
import io
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self

Action = Literal["503", "drop", "drop-mid", "rewrite"]
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade"}
)
COPY_CHUNK = 64 << 10


@dataclass
class Fault:
    """Fail requests whose method is `method` and whose path matches `path`.

    The first `after` matching requests pass, the next `times` fail
    (`times=None`: all of them). `rewrite` maps the registry's response body
    for the "rewrite" action.
    """

    method: str
    path: str
    action: Action
    times: int | None = 1
    after: int = 0
    rewrite: Callable[[bytes], bytes] | None = None
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.search(self.path, path) is not None

    def take(self) -> bool:
        """Count one matching request; True when this one must fail."""
        self.seen += 1
        if self.seen <= self.after:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    action: str
    """"forward", or the fault's action."""
    status: int | None
    """What the client got; None when the connection was dropped."""
    forwarded: int
    """Request-body bytes that reached the registry."""
    content_range: str | None
    response_range: str | None


@dataclass
class FlakyProxy:
    upstream: str
    """host:port of the plain-HTTP registry."""
    faults: list[Fault] = field(default_factory=list)
    log: list[Exchange] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def host(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        return f"127.0.0.1:{self._server.server_address[1]}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def reset(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def exchanges(self, method: str | None = None, path: str = "") -> list[Exchange]:
        with self._lock:
            return [
                e
                for e in self.log
                if (method is None or e.method == method) and re.search(path, e.path)
            ]

    def forwarded(self, method: str, path: str = "") -> int:
        return sum(e.forwarded for e in self.exchanges(method, path))

    def start(self) -> Self:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="flaky-proxy"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path) and fault.take():
                    return fault
        return None

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self.log.append(exchange)


def _handler_for(proxy: FlakyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle(self) -> None:
            # Clients probe https:// first on loopback; hang up on a TLS
            # ClientHello at once instead of waiting for a request line.
            try:
                first = self.connection.recv(1, socket.MSG_PEEK)
            except OSError:
                return
            if first in (b"", b"\x16"):
                return
            super().handle()

        def do_GET(self) -> None:
            self._handle()

        def do_HEAD(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self._handle()

        def do_PUT(self) -> None:
            self._handle()

        def do_PATCH(self) -> None:
            self._handle()

        def do_DELETE(self) -> None:
            self._handle()

        def _handle(self) -> None:
            self._body: BinaryIO = self.rfile
            length = int(self.headers.get("Content-Length") or 0)
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                # Streamed uploads: read whole (test blobs are small), then
                # forwarded and faulted like a body of that length.
                decoded = self._read_chunked()
                self._body, length = io.BytesIO(decoded), len(decoded)
            fault = proxy._fault_for(self.command, self.path)
            action = fault.action if fault is not None else "forward"
            content_range = self.headers.get("Content-Range")
            if action == "503":
                self._drain(length)
                # Logged before the client can see the outcome, so it is never missing.
                self._log(action, 503, 0, content_range, None)
                self._reply(503, b'{"errors":[{"code":"UNAVAILABLE","message":"flaky"}]}')
                return
            if action == "drop":
                self._drain(length)
                self.close_connection = True
                self._log(action, None, 0, content_range, None)
                return
            if action == "drop-mid":
                forwarded = self._forward_part(length, length // 2)
                self.close_connection = True
                self._log(action, None, forwarded, content_range, None)
                return
            upstream = self._open_upstream(length)
            forwarded = self._copy_body(length, upstream.send)
            response = upstream.getresponse()
            self._log(
                action, response.status, forwarded, content_range, response.getheader("Range")
            )
            try:
                self._relay(response, fault)
            finally:
                upstream.close()

        # -- pieces ----------------------------------------------------------

        def _open_upstream(self, length: int) -> http.client.HTTPConnection:
            host, _, port = proxy.upstream.rpartition(":")
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            connection.putrequest(
                self.command, self.path, skip_host=True, skip_accept_encoding=True
            )
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    connection.putheader(name, value)
            if length or self.command in ("PUT", "PATCH", "POST"):
                connection.putheader("Content-Length", str(length))
            connection.putheader("Connection", "close")
            connection.endheaders()
            return connection

        def _read_chunked(self) -> bytes:
            """A chunked request body (RFC 9112 7.1), decoded; trailers are dropped."""
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()

        def _copy_body(self, length: int, sink: Callable[[bytes], Any]) -> int:
            remaining = length
            while remaining:
                chunk = self._body.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    break
                sink(chunk)
                remaining -= len(chunk)
            return length - remaining

        def _drain(self, length: int) -> None:
            self._copy_body(length, lambda _chunk: None)

        def _forward_part(self, length: int, part: int) -> int:
            """Send the registry the headers and `part` body bytes, then hang up."""
            upstream = self._open_upstream(length)
            sent = self._copy_body(part, upstream.send)
            self._drain(length - sent)
            sock = upstream.sock
            assert sock is not None
            # Half-close and wait for the registry's answer (or its hang-up): by
            # then it has finished with the broken request and stored what it got.
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            try:
                while sock.recv(COPY_CHUNK):
                    pass
            except OSError:
                pass
            upstream.close()
            return sent

        def _relay(self, response: http.client.HTTPResponse, fault: Fault | None) -> None:
            headers = [(n, v) for n, v in response.getheaders() if n.lower() not in HOP_BY_HOP]
            bodyless = self.command == "HEAD" or response.status in (204, 304)
            declared = response.getheader("Content-Length")
            rewrite = fault.rewrite if fault is not None else None
            if rewrite is not None or (declared is None and not bodyless):
                body = response.read()
                if rewrite is not None:
                    body = rewrite(body)
                headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
                headers.append(("Content-Length", str(len(body))))
                self._start(response.status, headers)
                if not bodyless:
                    self.wfile.write(body)
                return
            self._start(response.status, headers)
            if bodyless:
                return
            while chunk := response.read(1 << 20):
                self.wfile.write(chunk)

        def _start(self, status: int, headers: list[tuple[str, str]]) -> None:
            self.send_response_only(status)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()

        def _reply(self, status: int, body: bytes) -> None:
            self._start(
                status,
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Retry-After", "0"),
                ],
            )
            self.wfile.write(body)

        def _log(
            self,
            action: str,
            status: int | None,
            forwarded: int,
            content_range: str | None,
            response_range: str | None,
        ) -> None:
            proxy._record(
                Exchange(
                    self.command,
                    self.path,
                    action,
                    status,
                    forwarded,
                    content_range,
                    response_range,
                )
            )

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the exchange log is what the tests read

    return Handler
