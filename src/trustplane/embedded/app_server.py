"""An ASGI application (FastAPI) served by uvicorn on 127.0.0.1, in a thread.

For tests that need the control plane's own application (its routers and
error handlers) behind real HTTP, with parts of it decided by the test;
the whole server as its own process is `control_plane.py`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from trustplane.errors import UnavailableError

START_TIMEOUT = 30.0


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve `app` on a free loopback port until the block ends; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UnavailableError("the application server on 127.0.0.1 did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT)
        sock.close()
