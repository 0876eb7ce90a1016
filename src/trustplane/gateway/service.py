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
from typing import Any

from trustplane.errors import TrustplaneError, UsageError
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
        if primary:
            config.listen.unlink(missing_ok=True)


def run(config: GatewayConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per decision is enough
    if config.workers <= 1:
        _run_loop(serve(config))
        return
    # Several processes accept on one listening socket (the kernel spreads the
    # connections): one Python process is one core, and the gateway should not
    # be the edge host's narrowest point. Each has its own control-plane link
    # and caches; only the first runs the MQTT link and the plugin socket.
    listener = bind_unix(config.listen, config.socket_mode)
    children: list[int] = []
    for _ in range(config.workers - 1):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _run_loop(serve(config, listener=listener, primary=False))
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    try:
        _run_loop(serve(config, listener=listener))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


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
