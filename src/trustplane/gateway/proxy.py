"""The gateway proxy: its own unix socket in front of dockerd's.

For each request on a client connection: read and check the head
(http1.py), parse the target (request.py), read the body when the decision
needs it (bounded), decide (decide.py), and only on an explicit allow send
dockerd a request rebuilt from what was decided on: the canonical target,
the client's headers minus hop-by-hop ones and the token, and clean body
framing. The answer is relayed as it arrives (logs -f, events, pull
progress), and an upgraded (101) or hijacked (raw-stream) connection is
piped both ways until either side is done.

`GET /_trustplane/health` is answered by the gateway itself, without a
token (health probes; `--allowed-uid` still applies): its own state, such
as whether the resource monitor can sample, 200 when well and 503 when
degraded. It names no container and forwards nothing.

A denial is a Docker-style JSON error (`{"message": …}`) with its status,
which the docker CLI prints as `Error response from daemon: …`; the
connection is closed after it, so no unread body can be taken for a next
request. Anything unexpected closes the connection without forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from trustplane.errors import MalformedError, TrustplaneError, UnavailableError
from trustplane.gateway import defaults
from trustplane.gateway.actions import Classified, classify
from trustplane.gateway.decide import TOKEN_HEADER, Gatekeeper, Peer
from trustplane.gateway.docker_api import INTERNAL_HEADER
from trustplane.gateway.http1 import (
    MAX_HEAD,
    READ_SIZE,
    Framing,
    Head,
    check_content_type,
    chunk,
    parse_request_head,
    parse_response_head,
    read_body,
    read_head,
    request_framing,
    response_framing,
    serialize_head,
)
from trustplane.gateway.monitor import ResourceMonitor
from trustplane.gateway.request import Target, parse_target

log = logging.getLogger("trustplane.gateway")
MAX_DECIDED_BODY = 4 * 1024 * 1024
IDLE_TIMEOUT = 300.0
BODY_TIMEOUT = 60.0
_TOO_LARGE = "the request body is too large"
SMALL_ANSWER = 256 * 1024
"""A body the decision needs must arrive within this (no slow-loris hold)."""
HIJACK_TYPES = ("application/vnd.docker.raw-stream", "application/vnd.docker.multiplexed-stream")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "content-length",
        "upgrade",
        "expect",
        TOKEN_HEADER,
        INTERNAL_HEADER.lower(),
    }
)


HEALTH = ("_trustplane", "health")
"""The gateway's own health path (never forwarded; not a Docker Engine API path)."""
HEAD_CACHE = 512
HEAD_CACHE_BYTES = 8192
"""At most HEAD_CACHE parsed request heads of at most this size are remembered."""
_Parsed = tuple[Head, Target, Framing, Classified | None]


class _Close(Exception):
    """End this client connection (after an answer was sent, or nothing can be)."""


@dataclass
class _Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


class GatewayProxy:
    def __init__(
        self,
        listen: Path,
        docker_socket: Path,
        gatekeeper: Gatekeeper,
        monitor: ResourceMonitor | None = None,
    ) -> None:
        self.listen = listen
        self.docker_socket = docker_socket
        self.gatekeeper = gatekeeper
        self.monitor = monitor
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.connections = 0
        self._heads: dict[bytes, _Parsed] = {}

    async def start(
        self, mode: int = defaults.SOCKET_MODE, listener: socket.socket | None = None
    ) -> None:
        """Listen on the socket path, or accept on `listener` (shared by worker processes)."""
        if listener is not None:
            self._server = await asyncio.start_unix_server(
                self._serve, sock=listener, limit=MAX_HEAD
            )
            return
        self.listen.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.listen.is_socket():
                self.listen.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.listen), limit=MAX_HEAD
        )
        self.listen.chmod(mode)

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- one client connection -----------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio keeps only weak references to tasks, and the stream protocol
        # only a weak one to the reader: without this strong reference a
        # connection waiting on both sides of a hijack is one unreachable cycle,
        # and the garbage collector destroys it mid-stream.
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        self.connections += 1
        peer = _peer(writer)
        upstream: list[_Upstream] = []
        try:
            while await self._exchange(reader, writer, peer, upstream):
                pass
        except _Close:
            pass
        except MalformedError as exc:
            await _answer_error(writer, 400, str(exc), head_only=False)
            self.gatekeeper.report_refusal(400, str(exc), peer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:  # never let one connection take the server down
            log.exception("gateway: unexpected error on a connection")
        finally:
            for connection in upstream:
                connection.close()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.connections -= 1

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer | None,
        upstream: list[_Upstream],
    ) -> bool:
        """One request and its answer; True when the connection may carry another."""
        async with asyncio.timeout(IDLE_TIMEOUT):
            data = await read_head(reader)
        if data is None:
            return False
        parsed = self._heads.get(data)
        if parsed is None:
            parsed = await self._parse(data, writer, peer)
        head, target, framing, classified = parsed
        method = head.start[0]
        head_only = method == "HEAD"
        if classified is None and target.segments == HEALTH and method in ("GET", "HEAD"):
            status, document = self.gatekeeper.health(peer)
            await _answer_json(writer, status, document, head_only)
            raise _Close
        expect = head.get("expect")
        body = b""
        streamed = classified is not None and classified.stream_body
        if not streamed and (framing.chunked or framing.length):
            if framing.length is not None and framing.length > MAX_DECIDED_BODY:
                await _answer_error(writer, 413, _TOO_LARGE, head_only)
                self.gatekeeper.report_refusal(413, _TOO_LARGE, peer, method=method,
                                               path=target.path)  # fmt: skip
                raise _Close
            if expect is not None:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            async with asyncio.timeout(BODY_TIMEOUT):
                bounded = await _read_bounded(reader, framing, writer, head_only)
            if bounded is None:
                self.gatekeeper.report_refusal(413, _TOO_LARGE, peer, method=method,
                                               path=target.path)  # fmt: skip
                raise _Close
            body = bounded
        verdict = await self.gatekeeper.decide(
            target, head.all(TOKEN_HEADER), body, peer, classified
        )
        if not verdict.allowed or classified is None:
            await _answer_error(writer, verdict.status, verdict.message, head_only)
            raise _Close
        try:
            connection = await self._upstream(upstream)
        except TrustplaneError as exc:
            await _answer_error(writer, 503, f"trustplane gateway: {exc}", head_only)
            raise _Close from None
        try:
            await _send_request(
                connection, head, target, classified, framing, body, streamed, reader, writer
            )
            response_data = await read_head(connection.reader)
            response = parse_response_head(response_data) if response_data else None
        except (ConnectionError, MalformedError) as exc:
            upstream.clear()
            connection.close()
            await _answer_error(writer, 502, f"trustplane gateway: dockerd: {exc}", head_only)
            raise _Close from None
        if response_data is None or response is None:
            upstream.clear()
            connection.close()
            await _answer_error(writer, 502, "trustplane gateway: dockerd closed", head_only)
            raise _Close
        status = int(response.start[1])
        if (
            self.monitor is not None
            and classified.action == "container.start"
            and classified.name is not None
            and target.segments[-1] in ("start", "restart", "unpause")
            and 200 <= status < 300
        ):
            self.monitor.watch(classified.name)
        if status == 101 or (
            classified.hijack
            and status == 200
            and response.get("content-type") in HIJACK_TYPES
            and not response.all("content-length")
            and not response.all("transfer-encoding")
        ):
            writer.write(response_data)
            await writer.drain()
            upstream.clear()
            await _pipe_both_ways(reader, writer, connection)
            raise _Close
        framing_out = response_framing(response, method)
        if verdict.image_id is not None and status == 201:
            # A create: hold dockerd's (small) answer until the container is confirmed.
            answer = b""
            with contextlib.suppress(MalformedError):
                async for piece in read_body(connection.reader, framing_out):
                    answer += piece
                    if len(answer) > MAX_DECIDED_BODY:
                        break
            if not await self.gatekeeper.confirm_created(verdict, answer):
                await _answer_error(writer, 403, verdict.message, head_only)
                raise _Close
            writer.write(_response_head(response, Framing(length=len(answer))) + answer)
            await writer.drain()
            return (
                "close" not in head.tokens("connection")
                and "close" not in response.tokens("connection")
                and not framing_out.until_close
            )
        try:
            if framing_out.length is not None and framing_out.length <= SMALL_ANSWER:
                # A small sized answer (most reads): head and body in one write,
                # one system call instead of two.
                parts = [_passed_on(response, response_data, framing_out)]
                async for piece in read_body(connection.reader, framing_out):
                    parts.append(piece)
                writer.write(b"".join(parts))
                await writer.drain()
            else:
                writer.write(_response_head(response, framing_out))
                await writer.drain()
                await _relay(connection.reader, writer, reader, framing_out)
        except MalformedError:
            raise _Close from None  # dockerd's body broke off; the client sees a cut stream
        client_closes = "close" in head.tokens("connection") or head.start[2] == "HTTP/1.0"
        if framing_out.until_close or "close" in response.tokens("connection"):
            upstream.clear()
            connection.close()
            return False
        return not client_closes

    async def _parse(self, data: bytes, writer: asyncio.StreamWriter, peer: Peer | None) -> _Parsed:
        """Head, target, framing and action of a request head; remembered when it is valid.

        Clients repeat the same head (`docker ps` polling, keep-alive
        loops): parsing is a pure function of its bytes, so a valid head
        seen before is not parsed again (a bounded cache; a refused head is
        never kept). Heads hold tokens: the cache is memory only, and only
        parsing is skipped; every request is still decided on its own.
        """
        head = parse_request_head(data)
        method = head.start[0]
        try:
            target = parse_target(method, head.start[1])
            framing = request_framing(head)
            check_content_type(head)
            expect = head.get("expect")
            if expect is not None and expect.lower() != "100-continue":
                raise MalformedError("only Expect: 100-continue is understood")
        except MalformedError as exc:
            await _answer_error(writer, 400, str(exc), method == "HEAD")
            self.gatekeeper.report_refusal(400, str(exc), peer, method=method, path=head.start[1])
            raise _Close from None
        classified: Classified | None
        try:
            classified = classify(target)
        except TrustplaneError:
            classified = None  # decide() denies it with the reason
        parsed = (head, target, framing, classified)
        if len(data) <= HEAD_CACHE_BYTES:
            if len(self._heads) >= HEAD_CACHE:
                del self._heads[next(iter(self._heads))]  # the oldest
            self._heads[data] = parsed
        return parsed

    async def _upstream(self, upstream: list[_Upstream]) -> _Upstream:
        if upstream and not upstream[0].writer.is_closing() and not upstream[0].reader.at_eof():
            return upstream[0]
        for stale in upstream:
            stale.close()
        upstream.clear()
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(self.docker_socket), limit=MAX_HEAD
            )
        except OSError as exc:
            raise UnavailableError(f"dockerd at {self.docker_socket}: {exc.strerror}") from None
        upstream.append(_Upstream(reader, writer))
        return upstream[0]


# -- requests ---------------------------------------------------------------------------


async def _read_bounded(
    reader: asyncio.StreamReader, framing: Framing, writer: asyncio.StreamWriter, head_only: bool
) -> bytes | None:
    """The body, or None when it was too large (refused with 413)."""
    parts: list[bytes] = []
    size = 0
    async for piece in read_body(reader, framing):
        size += len(piece)
        if size > MAX_DECIDED_BODY:
            await _answer_error(writer, 413, _TOO_LARGE, head_only)
            return None
        parts.append(piece)
    return b"".join(parts)


async def _send_request(
    connection: _Upstream,
    head: Head,
    target: Target,
    classified: Classified,
    framing: Framing,
    body: bytes,
    streamed: bool,
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
) -> None:
    headers = [(name, value) for name, value in head.headers if name not in _HOP_BY_HOP]
    upgrade = classified.hijack and "tcp" in head.tokens("upgrade")
    if upgrade:
        headers += [("Connection", "Upgrade"), ("Upgrade", "tcp")]
    if streamed and framing.chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    elif streamed:
        headers.append(("Content-Length", str(framing.length or 0)))
    elif body or head.start[0] in ("POST", "PUT"):
        headers.append(("Content-Length", str(len(body))))
    start = f"{head.start[0]} {target.upstream_target} HTTP/1.1"
    connection.writer.write(serialize_head(start, headers))
    if not streamed:
        connection.writer.write(body)
        await connection.writer.drain()
        return
    if head.get("expect") is not None:
        client_writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await client_writer.drain()
    async for piece in read_body(client_reader, framing):
        connection.writer.write(chunk(piece) if framing.chunked else piece)
        await connection.writer.drain()
    if framing.chunked:
        connection.writer.write(chunk(b""))
    await connection.writer.drain()


# -- responses --------------------------------------------------------------------------


def _response_head(response: Head, framing: Framing) -> bytes:
    """dockerd's head, with framing the gateway itself writes (chunked stays chunked)."""
    headers = [
        (name, value)
        for name, value in response.headers
        if name not in ("content-length", "transfer-encoding", "connection", "keep-alive")
    ]
    if framing.chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    elif framing.length is not None and int(response.start[1]) not in (204, 304):
        length = response.get("content-length")
        headers.append(("Content-Length", str(framing.length) if length is None else length))
    if framing.until_close:
        headers.append(("Connection", "close"))
    _version, status, reason = response.start
    return serialize_head(f"HTTP/1.1 {status} {reason}", headers)


_REFRAMED = ("content-length", "transfer-encoding", "connection", "keep-alive")


def _passed_on(response: Head, data: bytes, framing: Framing) -> bytes:
    """dockerd's head as it came, when `_response_head` would only re-spell it.

    That is an HTTP/1.1 answer sized by exactly one Content-Length and none
    of the headers the gateway rewrites: the same head, without building it
    again (the bytes were checked by parse_response_head all the same).
    """
    index = response.index
    if (
        response.start[0] == "HTTP/1.1"
        and framing.length is not None
        and len(index.get("content-length", ())) == 1
        and not any(name in index for name in _REFRAMED[1:])
        and response.start[1] not in ("204", "304")
    ):
        return data
    return _response_head(response, framing)


async def _relay(
    upstream: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    client: asyncio.StreamReader,
    framing: Framing,
) -> None:
    """Copy the answer as it comes; stop when the client goes away (events, logs -f)."""
    if framing.length is not None:
        # A sized answer ends by itself: copy it inline (the common, fast case).
        async for piece in read_body(upstream, framing):
            writer.write(piece)
            await writer.drain()
        return

    async def copy() -> None:
        async for piece in read_body(upstream, framing):
            writer.write(chunk(piece) if framing.chunked else piece)
            await writer.drain()
        if framing.chunked:
            writer.write(chunk(b""))
            await writer.drain()

    task = asyncio.create_task(copy())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and (client.at_eof() or writer.is_closing()):
                task.cancel()
                raise _Close
        task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _pipe_both_ways(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    connection: _Upstream,
) -> None:
    """After 101 (or the old raw-stream hijack): bytes both ways, half-closes passed on."""

    async def pump(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, half_close: bool
    ) -> None:
        while piece := await source.read(READ_SIZE):
            sink.write(piece)
            await sink.drain()
        if half_close and sink.can_write_eof():
            sink.write_eof()

    to_docker = asyncio.create_task(pump(client_reader, connection.writer, True))
    to_client = asyncio.create_task(pump(connection.reader, client_writer, False))
    try:
        done, _ = await asyncio.wait({to_docker, to_client}, return_when=asyncio.FIRST_COMPLETED)
        if to_docker in done and to_docker.exception() is None:
            await to_client  # the client closed its input; the output may still come
    finally:
        for task in (to_docker, to_client):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        connection.close()


async def _answer_error(
    writer: asyncio.StreamWriter, status: int, message: str, head_only: bool
) -> None:
    await _answer_json(writer, status, {"message": message}, head_only)


async def _answer_json(
    writer: asyncio.StreamWriter, status: int, document: dict[str, Any], head_only: bool
) -> None:
    """An answer made by the gateway itself; the connection closes after it."""
    body = json.dumps(document).encode() + b"\n"
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    with contextlib.suppress(ConnectionError, RuntimeError):
        writer.write(serialize_head(f"HTTP/1.1 {status} {reason}", headers))
        if not head_only:
            writer.write(body)
        await writer.drain()


def _peer(writer: asyncio.StreamWriter) -> Peer | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)
