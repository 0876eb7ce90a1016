"""The gateway inside another program (`trustplane agent`): a thread with its own event loop.

The agent's attestation loop is synchronous and owns the main thread (and
so the signals); the gateway serves beside it on its own asyncio loop and
is stopped through an event when the agent ends. The agent does not start
until the gateway is serving, and a gateway that fails to start stops the
agent with its error: a node must not run believing it is guarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from trustplane.errors import UnavailableError, UsageError
from trustplane.gateway.service import GatewayConfig, serve

STOP_TIMEOUT = 30.0
log = logging.getLogger("trustplane.gateway")


class GatewayThread:
    def __init__(self, config: GatewayConfig) -> None:
        if config.workers != 1:
            raise UsageError("a gateway inside the agent runs one worker")
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="trustplane-gateway", daemon=True)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() / stop()
            self._failure = exc
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        ready = asyncio.Event()
        waiter = asyncio.create_task(ready.wait())
        waiter.add_done_callback(lambda _: self._ready.set())
        try:
            await serve(self.config, ready=ready, stop=self._stop)
        finally:
            waiter.cancel()

    def start(self, timeout: float = 120.0) -> None:
        """Serve; returns once the socket accepts, or raises why it could not."""
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise UnavailableError(f"the gateway did not start within {timeout:.0f} s")
        if self._failure is not None:
            self._thread.join(STOP_TIMEOUT)
            raise self._failure
        log.info("gateway on unix://%s inside the agent", self.config.listen)

    def stop(self) -> None:
        """Stop serving, close every connection and remove the socket; idempotent."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(stop.set)
        if self._thread.ident is not None:
            self._thread.join(STOP_TIMEOUT)

    @property
    def failure(self) -> BaseException | None:
        """What ended the gateway early, if it did."""
        return self._failure


@contextmanager
def gateway_beside(config: GatewayConfig | None) -> Iterator[GatewayThread | None]:
    """Run the gateway (if configured) for the duration of the block.

    SIGTERM ends the block (SystemExit) like Ctrl-C does, so that the
    gateway closes its connections and removes its socket either way.
    """
    if config is None:
        yield None
        return
    thread = GatewayThread(config)
    thread.start()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit) if main else None
    try:
        yield thread
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        thread.stop()


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
