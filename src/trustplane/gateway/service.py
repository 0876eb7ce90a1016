"""`trustplane gateway`: the proxy with its control-plane link, until stopped."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from trustplane.errors import UsageError
from trustplane.gateway.control_link import ControlLink, NodeCredential
from trustplane.gateway.decide import Gatekeeper
from trustplane.gateway.docker_api import DockerApi
from trustplane.gateway.host_access import CATEGORIES
from trustplane.gateway.proxy import GatewayProxy


@dataclass(frozen=True)
class GatewayConfig:
    listen: Path
    docker: Path
    server: str
    ca_file: Path | None = None
    node: NodeCredential | None = None
    token_file: Path | None = None
    allow_host_access: frozenset[str] = frozenset()
    socket_mode: int = 0o660
    control_timeout: float = 5.0
    allowed_uids: frozenset[int] = frozenset()


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


async def serve(config: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    link = ControlLink(
        config.server,
        config.ca_file,
        node=config.node,
        token_file=config.token_file,
        timeout=config.control_timeout,
    )
    docker = DockerApi(str(config.docker))
    gatekeeper = Gatekeeper(link, docker, config.allow_host_access, config.allowed_uids)
    proxy = GatewayProxy(config.listen, config.docker, gatekeeper)
    try:
        await link.ensure_identity()  # its identity must work before it accepts anyone
        await proxy.start(config.socket_mode)
        if ready is not None:
            ready.set()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        serving = asyncio.create_task(proxy.serve_forever())
        await stop.wait()
        serving.cancel()
    finally:
        await proxy.close()
        await link.close()
        await docker.close()
        config.listen.unlink(missing_ok=True)


def run(config: GatewayConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per decision is enough
    try:
        # uvloop comes with uvicorn[standard]; it cuts the proxy's own latency.
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
