"""`trustplane server`: bootstrap once, then serve over TLS.

The embedded default makes a CA in DATA_DIR/tls at first start and a server
certificate from it (clients pin DATA_DIR/tls/ca.pem); an operator can give
a certificate and key instead. With several workers, the parent process
bootstraps (schema, system keys, first admin) and each uvicorn worker then
opens its own connections, log sequencer and caches.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import ipaddress
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import anyio.to_thread
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from trustplane.atomic import atomic_write
from trustplane.control.app import create_app
from trustplane.control.db import database_url
from trustplane.control.service import build
from trustplane.control.settings import ServerSettings
from trustplane.crypto.certificates import issue_leaf, self_signed
from trustplane.errors import UnavailableError, UsageError

_SETTINGS_ENV = "TRUSTPLANE_SERVER_SETTINGS_JSON"
THREADS = 64
"""Threads for synchronous handlers: enough for every client of a busy gateway."""


def tls_files(settings: ServerSettings) -> tuple[Path, Path]:
    if settings.tls.cert_file or settings.tls.key_file:
        if not (settings.tls.cert_file and settings.tls.key_file):
            raise UsageError("give both tls.cert_file and tls.key_file")
        return settings.tls.cert_file, settings.tls.key_file
    directory = settings.data_dir / "tls"
    cert, key = directory / "server.pem", directory / "server-key.pem"
    if not cert.exists():
        _bootstrap_tls(directory, settings.host_port[0], cert, key)
    return cert, key


def _bootstrap_tls(directory: Path, host: str, cert: Path, key: Path) -> None:
    """A CA of our own (clients pin ca.pem) and a server certificate for `host` and loopback."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = self_signed("trustplane control plane CA")
    atomic_write(directory / "ca-key.pem", ca.key_pem(), mode=0o600)
    atomic_write(directory / "ca.pem", ca.certificate_pem())
    ips = ["127.0.0.1"]
    names = ["localhost", socket.gethostname()]
    try:
        if ipaddress.ip_address(host) and host not in ("0.0.0.0", "::"):  # noqa: S104
            ips.append(host)
    except ValueError:
        names.append(host)
    server = issue_leaf(ca, names[0], dns_names=names, ip_addresses=list(dict.fromkeys(ips)))
    atomic_write(key, server.key_pem(), mode=0o600)
    atomic_write(cert, server.certificate_pem())  # last: its presence means "bootstrapped"


def bind_listener(settings: ServerSettings) -> socket.socket:
    """The server's listening socket, bound before anything is initialised: a port
    in use, or an address this host does not have, leaves the data directory as
    it was (uvicorn would bind only after the data directory is set up)."""
    host, port = settings.host_port
    where = f"--listen {settings.listen}"
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UsageError(f"{where}: unknown host ({exc.strerror})") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise UnavailableError(f"{where}: the port is in use by another program") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"{where}: {host} is not an address of this host") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"{where}: permission denied (ports below 1024 need root)") from None
        raise
    listener.set_inheritable(True)  # worker processes serve on it too
    return listener


def serve(settings: ServerSettings, listener: socket.socket | None = None) -> None:
    listener = listener or bind_listener(settings)
    try:
        _serve(settings, listener)
    finally:
        listener.close()


def _serve(settings: ServerSettings, listener: socket.socket) -> None:
    database_url(settings.db_url)  # a wrong one is refused before the data directory exists
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = tls_files(settings)
    host, port = settings.host_port
    # SIGTERM before uvicorn serves, or re-raised by uvicorn once it has shut
    # down: the stop an operator asked for, so exit 0 (not "killed by SIGTERM").
    signal.signal(signal.SIGTERM, _stopped)
    common = {
        "host": host,
        "port": port,
        "http": PromptlyClosedHttp,
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
        "log_level": "warning",
        "access_log": False,
        "timeout_keep_alive": 30,
        "backlog": 2048,
    }
    # uvicorn.Server and Multiprocess on our socket: what uvicorn.run does after
    # binding one itself.
    if settings.workers == 1:
        plane = build(settings)
        config = uvicorn.Config(_with_threads(create_app(plane)), **common)  # type: ignore[arg-type]
        server = uvicorn.Server(config)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a clean stop, as uvicorn.run
            server.run(sockets=[listener])
        if not server.started:
            raise UnavailableError("the control plane did not start (see uvicorn's lines above)")
        return
    build(settings).close()  # schema, keys and the first admin, once
    os.environ[_SETTINGS_ENV] = settings.model_dump_json()
    config = uvicorn.Config(
        "trustplane.control.server:worker_app",
        factory=True,
        workers=settings.workers,
        **common,  # type: ignore[arg-type]
    )
    with contextlib.suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[listener]).run()


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


class PromptlyClosedHttp(HttpToolsProtocol):
    """uvicorn's HTTP protocol, whose connections end at once when the server stops.

    At shutdown uvicorn closes a connection gracefully (at once when idle,
    after the response in flight otherwise), and the TLS transport then waits
    for the client's close_notify, up to asyncio's (and uvloop's)
    ssl_shutdown_timeout of 30 s. An idle keep-alive connection, as every
    client's connection pool holds, is never read by its client, so one such
    client kept a stopping replica alive for 30 s (seen as ~20 s from outside).
    Once the server stops, a connection with no response in flight is aborted
    instead: no request is being served on it, so nothing is lost.
    """

    _lost = False

    def shutdown(self) -> None:
        super().shutdown()
        self._abort_when_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        super().connection_lost(exc)

    def _abort_when_idle(self) -> None:
        if self._lost or self.transport is None:
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.abort()
        else:  # a response is in flight: it finishes first
            self.loop.call_later(0.05, self._abort_when_idle)


def worker_app() -> FastAPI:
    """The app of one uvicorn worker (uvicorn imports this by name)."""
    settings = ServerSettings.model_validate(json.loads(os.environ[_SETTINGS_ENV]))
    return _with_threads(create_app(build(settings, announce=False)))


def _with_threads(app: FastAPI) -> FastAPI:
    """Serving tweaks, applied when the app starts in its worker process.

    (A lifespan, not `@app.on_event("startup")`: FastAPI ignores startup
    events once an app has a lifespan, as create_app's has.)
    """
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(started: FastAPI) -> AsyncIterator[Any]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        async with inner(started) as state:
            # Everything built so far (the app, its caches and keys, the
            # imported modules) lives as long as the process: move it out of
            # the cyclic collector's sight. Otherwise every full collection
            # walks it all, about 100 ms with the GIL held, several times a
            # second under load: that was the 99th percentile.
            gc.collect()
            gc.freeze()
            yield state

    app.router.lifespan_context = lifespan
    return app
