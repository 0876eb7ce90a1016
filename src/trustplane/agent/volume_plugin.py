"""The Docker volume plugin on this node: `trustplane volume-plugin`, `agent --volume-plugin`.

dockerd finds a legacy plugin by its socket in /run/docker/plugins
(`trustplane.sock` answers `-d trustplane`). The socket is 0600: whoever
talks to it creates, opens and removes volumes with this node's identity,
so only root (dockerd) may. The driver recovers what an earlier run left
before the socket accepts, so dockerd never sees a half-known state. When
the plugin stops, open volumes stay open for their containers; the next
start adopts them. A tender thread calls `driver.tend()` every
TEND_INTERVAL seconds: leased keys are forgotten at their expiry, and what
the control plane missed while unreachable is sent once it answers.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from trustplane.errors import UnavailableError
from trustplane.gateway.service import bind_unix
from trustplane.volumes.attachers.docker_plugin.app import create_app
from trustplane.volumes.attachers.docker_plugin.driver import Recovery, VolumeDriver
from trustplane.volumes.attachers.docker_plugin.protocol import DRIVER_NAME

DEFAULT_SOCKET = Path(f"/run/docker/plugins/{DRIVER_NAME}.sock")
DEFAULT_ROOT = Path("/run/trustplane/volume-plugin")
"""Runtime state: what is open is gone after a reboot, and so is this directory."""
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
TEND_INTERVAL = 1.0
log = logging.getLogger("trustplane.volumes.plugin")


class _Stopped(Exception):
    """SIGTERM, which uvicorn raises again once it has shut down."""


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped


class VolumePluginServer:
    """The driver behind its unix socket; `run()` in the foreground or `beside()` in a thread."""

    def __init__(self, driver: VolumeDriver, socket: Path = DEFAULT_SOCKET) -> None:
        self.driver = driver
        self.socket = socket
        self.recovery: Recovery | None = None
        config = uvicorn.Config(
            create_app(driver), log_level="warning", access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)

    def _recover(self) -> None:
        self.recovery = report = self.driver.start()
        log.info(
            "volume plugin state: adopted %s, opened again %s, lost %s, cleared %s",
            report.adopted or "-", report.reopened or "-", report.lost or "-",
            report.cleared or "-",
        )  # fmt: skip

    @contextlib.contextmanager
    def _tending(self) -> Iterator[None]:
        stop = threading.Event()

        def tend() -> None:
            while not stop.wait(TEND_INTERVAL):
                try:
                    self.driver.tend()
                except Exception:
                    log.exception("volume plugin: tending failed")

        thread = threading.Thread(target=tend, name="trustplane-volume-plugin-tend", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(STOP_TIMEOUT)

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT (uvicorn's handlers); volumes stay open."""
        self._recover()
        try:
            listener = bind_unix(self.socket, 0o600)
            try:
                # uvicorn re-raises the signal it stopped on: without a handler of ours,
                # SIGTERM would end the process before the driver's stop below.
                previous = signal.signal(signal.SIGTERM, _stopped)
                try:
                    with contextlib.suppress(KeyboardInterrupt, _Stopped), self._tending():
                        self._server.run(sockets=[listener])
                finally:
                    signal.signal(signal.SIGTERM, previous)
            finally:
                listener.close()
                self.socket.unlink(missing_ok=True)
        finally:
            self.driver.stop()
        if not self._server.started:
            raise UnavailableError("the volume plugin did not start (see uvicorn's lines above)")

    @contextlib.contextmanager
    def beside(self) -> Iterator[VolumePluginServer]:
        """Serve in a thread until the block ends (inside the agent)."""
        self._recover()
        try:
            listener = bind_unix(self.socket, 0o600)
            thread = threading.Thread(
                target=self._server.run, kwargs={"sockets": [listener]},
                name="trustplane-volume-plugin", daemon=True,
            )  # fmt: skip
            thread.start()
            try:
                deadline = time.monotonic() + START_TIMEOUT
                while not self._server.started:
                    if not thread.is_alive() or time.monotonic() > deadline:
                        raise UnavailableError(f"the volume plugin did not start on {self.socket}")
                    time.sleep(0.02)
                log.info("volume plugin on unix://%s", self.socket)
                with self._tending():
                    yield self
            finally:
                self._server.should_exit = True
                thread.join(STOP_TIMEOUT)
                listener.close()
                self.socket.unlink(missing_ok=True)
        finally:
            self.driver.stop()
