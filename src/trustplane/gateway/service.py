"""`trustplane gateway`: the proxy with its control-plane link, until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from trustplane import errors
from trustplane.errors import TrustplaneError, UnavailableError, UsageError
from trustplane.gateway import defaults
from trustplane.gateway.authz_plugin import AuthzPlugin
from trustplane.gateway.control_link import ControlLink, NodeCredential
from trustplane.gateway.decide import Gatekeeper
from trustplane.gateway.docker_api import DockerApi
from trustplane.gateway.host_access import CATEGORIES
from trustplane.gateway.image_signatures import SignatureCheck, SignaturePolicy
from trustplane.gateway.monitor import ResourceMonitor, Source, Thresholds
from trustplane.gateway.mqtt_link import MqttConfig, MqttLink
from trustplane.gateway.proxy import GatewayProxy
from trustplane.gateway.reporter import Reporter
from trustplane.gateway.revocations import RevocationWatch

log = logging.getLogger("trustplane.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    listen: Path
    docker: Path
    server: str
    ca_file: Path | None = None
    node: NodeCredential | None = None
    token_file: Path | None = None
    allow_host_access: frozenset[str] = frozenset()
    socket_mode: int = defaults.SOCKET_MODE
    control_timeout: float = defaults.CONTROL_TIMEOUT
    allowed_uids: frozenset[int] = frozenset()
    thresholds: Thresholds = field(default_factory=Thresholds)
    mqtt: MqttConfig | None = None
    authz_plugin: Path | None = None
    workers: int = defaults.WORKERS
    """Proxy processes sharing the socket (the first also runs MQTT and the plugin)."""
    signatures: SignaturePolicy = field(default_factory=SignaturePolicy)
    """Keys whose image signatures this gateway trusts; whether it requires one."""
    require_scoped_tokens: bool = False
    """Refuse tokens not scoped to this gateway (unscoped ones included)."""
    monitor_source: Source = defaults.MONITOR_SOURCE
    """Where the resource monitor samples: cgroup files, the Engine stats API, or both."""
    cgroup_root: Path = defaults.CGROUP_ROOT
    """Where the host's cgroup filesystem is mounted (another place in a container)."""
    allow_blind_monitor: bool = defaults.ALLOW_BLIND_MONITOR
    """Let containers start while the resource monitor cannot sample (refused by default)."""


def unix_path(url: str, option: str) -> Path:
    """`unix:///run/x.sock` (or a plain absolute path) as a Path."""
    path = url.removeprefix("unix://")
    if not path.startswith("/"):
        raise UsageError(f"{option} must be unix:///absolute/path, not {url!r}")
    return Path(path)


def check_categories(names: list[str]) -> frozenset[str]:
    unknown = set(names) - CATEGORIES
    if unknown:
        raise UsageError(
            f"unknown host access {sorted(unknown)}; known: {', '.join(sorted(CATEGORIES))}"
        )
    return frozenset(names)


async def serve(
    config: GatewayConfig,
    ready: asyncio.Event | None = None,
    listener: socket.socket | None = None,
    primary: bool = True,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, or until `stop` is set (then signals are left alone)."""
    link = ControlLink(
        config.server,
        config.ca_file,
        node=config.node,
        token_file=config.token_file,
        timeout=config.control_timeout,
    )
    docker = DockerApi(str(config.docker))
    reporter = Reporter(link)
    monitor = ResourceMonitor(
        docker,
        config.thresholds,
        reporter,
        cgroup_root=config.cgroup_root,
        source=config.monitor_source,
        allow_blind=config.allow_blind_monitor,
    )
    gatekeeper = Gatekeeper(
        link,
        docker,
        config.allow_host_access,
        config.allowed_uids,
        reporter=reporter,
        signatures=SignatureCheck(link, config.signatures),
        require_scoped_tokens=config.require_scoped_tokens,
        monitor=monitor,
    )
    proxy = GatewayProxy(config.listen, config.docker, gatekeeper, monitor)
    revocations = RevocationWatch(link)
    gatekeeper.revocations = revocations
    mqtt_link: MqttLink | None = None
    plugin: AuthzPlugin | None = None
    try:
        await link.ensure_identity()  # its identity must work before it accepts anyone
        with contextlib.suppress(TrustplaneError):  # else stale: every token asked afresh
            await revocations.poll()
        revocations.start()
        reporter.start()
        monitor.start()
        if config.mqtt is not None and primary:
            mqtt_link = MqttLink(config.mqtt, link, docker, gatekeeper.images, monitor, reporter)
            await mqtt_link.start()
        await proxy.start(config.socket_mode, listener)
        if config.authz_plugin is not None and primary:
            plugin = AuthzPlugin(config.authz_plugin, gatekeeper)
            await plugin.start()
        if ready is not None:
            ready.set()
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
        serving = asyncio.create_task(proxy.serve_forever())
        await stop.wait()
        serving.cancel()
    finally:
        await proxy.close()
        if plugin is not None:
            await plugin.close()
        if mqtt_link is not None:
            await mqtt_link.close()
        await revocations.close()
        await monitor.close()
        await reporter.close()
        await link.close()
        await docker.close()
        if listener is None:  # bound here; a shared listener's path is its owner's
            config.listen.unlink(missing_ok=True)


def run(config: GatewayConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per decision is enough
    if config.workers <= 1:
        _run_loop(serve(config))
        return
    _supervise(config)


def _supervise(config: GatewayConfig) -> None:
    """Several worker processes accept on one listening socket; this one watches them.

    One Python process is one core, and the gateway should not be the edge
    host's narrowest point: the kernel spreads connections over the workers.
    Each has its own control-plane link and caches; the first also runs the
    MQTT link and the plugin socket. This process serves nothing (forking a
    replacement from a running event loop is not safe), so it can notice a
    worker that dies: it logs it and starts another in its place (the first
    worker's role included). A worker that fails with an error before it
    ever served is a start-up failure (the control plane unreachable, a bad
    key) that another would meet too: the others are stopped and its error is
    the gateway's, as with one worker.
    """
    listener = bind_unix(config.listen, config.socket_mode)
    workers: dict[int, _Worker] = {}
    stopping = False
    failure: TrustplaneError | None = None

    def stop(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def start(primary: bool) -> None:
        worker = _Worker.fork(config, listener, primary)
        workers[worker.pid] = worker
        if stopping:  # a signal came while it was forked
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(config.workers):
            start(primary=index == 0)
        while workers:
            pid, status = os.wait()
            worker = workers.pop(pid, None)
            if worker is None:
                continue
            served, error = worker.outcome()
            how = _how_it_ended(status) + (f" ({error})" if error else "")
            if stopping:
                continue
            if not served and error:  # it failed to start, and so would another
                log.error("gateway: worker %d %s before it served; stopping", pid, how)
                failure = _error_of(error)
                stop()
                continue
            when = "" if served else " before it served"
            log.error("gateway: worker %d %s%s; starting another in its place", pid, how, when)
            start(worker.primary)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        stop()
        for pid in list(workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        listener.close()
        config.listen.unlink(missing_ok=True)
    if failure is not None:
        raise failure


@dataclass
class _Worker:
    """A forked worker, and the read end of the pipe it reports on: b"." once it
    serves, b"!" and its error when it fails."""

    pid: int
    primary: bool
    pipe: int

    @classmethod
    def fork(cls, config: GatewayConfig, listener: socket.socket, primary: bool) -> _Worker:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)  # serve() installs its own
            code = 0
            try:
                _run_loop(_work(config, listener, primary, write))
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.write(write, f"!{type(exc).__name__}: {exc}"[:4000].encode())
                code = 1
            os._exit(code)
        os.close(write)
        os.set_blocking(read, False)
        return cls(pid, primary, read)

    def outcome(self) -> tuple[bool, str]:
        """(whether it ever served, its error if it reported one); closes the pipe."""
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.pipe, 4096):
                data += chunk
        os.close(self.pipe)
        served = data.startswith(b".")
        _, _, error = data.lstrip(b".").partition(b"!")
        return served, error.decode(errors="replace")


async def _work(config: GatewayConfig, listener: socket.socket, primary: bool, pipe: int) -> None:
    ready = asyncio.Event()

    async def announce() -> None:
        await ready.wait()
        os.write(pipe, b".")
        log.info("gateway: worker %d serving", os.getpid())

    announcing = asyncio.create_task(announce())
    try:
        await serve(config, ready=ready, listener=listener, primary=primary)
    finally:
        announcing.cancel()


def _how_it_ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"was killed by {signal.Signals(number).name}"
        except ValueError:
            return f"was killed by signal {number}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _error_of(text: str) -> TrustplaneError:
    """The error a worker reported (`Name: message`), as the same trustplane error."""
    name, _, message = text.partition(": ")
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, TrustplaneError):
        return kind(message)
    return UnavailableError(f"a gateway worker failed: {text}")


def bind_unix(path: Path, mode: int) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(mode)
    listener.listen(1024)
    return listener


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        # uvloop comes with uvicorn[standard]; it cuts the proxy's own latency.
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
