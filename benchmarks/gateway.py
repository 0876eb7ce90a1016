"""Edge gateway overhead: `GET /containers/json` and `docker ps`, three ways, one run.

The script starts what it needs on this machine: dockerd (or reuses the one
on /var/run/docker.sock), a `trustplane server`, a registered gateway node
and `trustplane gateway` in front of dockerd, and HAProxy (Debian's
`haproxy`) as a plain HTTP proxy on a unix socket in front of the same
dockerd, with its own config. Each target is then measured the same way:

- `GET /v1.41/containers/json` on keep-alive connections, from 1 client and
  from N clients (separate processes, so the load generator is not one
  GIL): latency p50/p99 and requests per second;
- `docker ps` (the real CLI, a new connection per run, `_ping` and the
  list): p50/p99 of the whole command.

"added" is a target's latency minus the direct socket's at the same
percentile; "ratio" is its throughput over the direct socket's. Every
request carries the gateway's token header (dockerd and HAProxy ignore it).

    python benchmarks/gateway.py [--seconds 5] [--clients 32] [--ps-runs 40]
        [--gateway-workers N]

Goal: gateway added latency <= 1 ms at p50 and <= 5 ms at p99; throughput
>= 0.9x direct.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trustplane.atomic import atomic_write
from trustplane.crypto.keys import generate_key_pair
from trustplane.embedded.control_plane import start_control_plane
from trustplane.embedded.dockerd import ensure_dockerd
from trustplane.embedded.process import ManagedProcess, UnixSocketReady, require_binary

PATH = "/v1.41/containers/json"


@dataclass(frozen=True)
class Run:
    latencies: list[float]
    requests: int
    seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _request(token: str) -> bytes:
    return (
        f"GET {PATH} HTTP/1.1\r\nHost: docker\r\nUser-Agent: bench\r\n"
        f"X-Trustplane-Token: {token}\r\n\r\n"
    ).encode()


def _read_response(sock: socket.socket, buffer: bytearray) -> None:
    """Read one response with Content-Length or chunked framing off `sock`."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buffer += data
    head_end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:head_end]).lower()
    if not head.startswith(b"http/1.1 200"):
        raise ConnectionError(head[:200].decode(errors="replace"))
    if b"content-length:" in head:
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(buffer) < head_end + length:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            buffer += data
        del buffer[: head_end + length]
        return
    while b"\r\n0\r\n\r\n" not in buffer[head_end - 2 :]:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buffer += data
    end = buffer.index(b"\r\n0\r\n\r\n", head_end - 2) + 7
    del buffer[:end]


def _client(path: str, token: str, seconds: float, queue: multiprocessing.Queue[Run]) -> None:
    request = _request(token)
    latencies: list[float] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        buffer = bytearray()
        for _ in range(20):  # warm-up (whoami cached, connections open)
            sock.sendall(request)
            _read_response(sock, buffer)
        began = time.perf_counter()
        end = began + seconds
        while (now := time.perf_counter()) < end:
            sock.sendall(request)
            _read_response(sock, buffer)
            latencies.append(time.perf_counter() - now)
        queue.put(Run(latencies, len(latencies), time.perf_counter() - began))


def load(path: Path, token: str, clients: int, seconds: float) -> Run:
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[Run] = context.Queue()
    workers = [
        context.Process(target=_client, args=(str(path), token, seconds, queue))
        for _ in range(clients)
    ]
    for worker in workers:
        worker.start()
    runs = [queue.get(timeout=seconds + 60) for _ in workers]
    for worker in workers:
        worker.join()
    latencies = [value for run in runs for value in run.latencies]
    return Run(latencies, sum(r.requests for r in runs), max(r.seconds for r in runs))


def docker_ps(path: Path, config_dir: Path, runs: int) -> list[float]:
    env = {**os.environ, "DOCKER_HOST": f"unix://{path}", "DOCKER_CONFIG": str(config_dir)}
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(["docker", "ps"], env=env, check=True, capture_output=True, timeout=60)
        times.append(time.perf_counter() - began)
    return times


@contextmanager
def haproxy(directory: Path, docker_socket: Path) -> Iterator[Path]:
    binary = require_binary("haproxy", "haproxy")
    directory.mkdir(parents=True, exist_ok=True)
    listen = directory / "haproxy.sock"
    config = directory / "haproxy.cfg"
    config.write_text(
        "global\n  maxconn 4096\n\n"
        "defaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n"
        "  timeout client 300s\n  timeout server 300s\n\n"
        f"frontend docker\n  bind unix@{listen} mode 660\n  default_backend dockerd\n\n"
        f"backend dockerd\n  server dockerd unix@{docker_socket}\n"
    )
    process = ManagedProcess(
        "haproxy", [binary, "-db", "-f", str(config)], directory, ready=UnixSocketReady(listen)
    ).start()
    try:
        yield listen
    finally:
        process.stop()


@contextmanager
def gateway(
    directory: Path,
    server_url: str,
    ca: Path,
    docker_url: str,
    node: str,
    key_file: Path,
    workers: int = 1,
) -> Iterator[Path]:
    listen = directory / "gateway.sock"
    process = ManagedProcess(
        "trustplane gateway",
        [
            sys.executable,
            "-m",
            "trustplane",
            "gateway",
            "--listen",
            f"unix://{listen}",
            "--docker",
            docker_url,
            "--server",
            server_url,
            "--ca",
            str(ca),
            "--node",
            node,
            "--node-key",
            str(key_file),
            "--workers",
            str(workers),
        ],
        directory,
        ready=UnixSocketReady(listen),
        timeout=60,
    ).start()
    try:
        yield listen
    finally:
        process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--ps-runs", type=int, default=40)
    parser.add_argument("--gateway-workers", type=int, default=1)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tp-bench-gw-"))
    daemon = ensure_dockerd(work / "dockerd")
    plane = start_control_plane(work / "control-plane")
    try:
        key_file = work / "node-key.pem"
        private, public = generate_key_pair("ec-p256")
        atomic_write(key_file, private, mode=0o600)
        node = f"bench-gw-{os.getpid()}"
        with plane.admin() as admin:
            admin.register_node(node, "gateway", public.decode())
            created = admin.create_user(f"bench-op-{os.getpid()}", "operator")
        with plane.client() as client:
            token = client.login(created.name, created.password).access_token
        config_dir = work / "docker-config"
        config_dir.mkdir()
        (config_dir / "config.json").write_text(
            json.dumps({"HttpHeaders": {"X-Trustplane-Token": token}})
        )
        with (
            gateway(
                work,
                plane.url,
                plane.ca_file,
                daemon.base_url,
                node,
                key_file,
                options.gateway_workers,
            ) as gw,
            haproxy(work / "haproxy", daemon.socket) as ha,
        ):
            targets = {"direct": daemon.socket, "haproxy": ha, "gateway": gw}
            results: dict[str, dict[str, float]] = {}
            for name, path in targets.items():
                one = load(path, token, 1, options.seconds)
                many = load(path, token, options.clients, options.seconds)
                ps = docker_ps(path, config_dir, options.ps_runs)
                results[name] = {
                    "p50": percentile(one.latencies, 0.5) * 1000,
                    "p99": percentile(one.latencies, 0.99) * 1000,
                    "rps1": one.rps,
                    "p50n": percentile(many.latencies, 0.5) * 1000,
                    "p99n": percentile(many.latencies, 0.99) * 1000,
                    "rpsn": many.rps,
                    "ps50": statistics.median(ps) * 1000,
                    "ps99": percentile(ps, 0.99) * 1000,
                }
    finally:
        plane.stop()
        if daemon.started_by_us:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(results, options.clients)


def report(results: dict[str, dict[str, float]], clients: int) -> None:
    direct = results["direct"]
    print(f"GET {PATH}; 1 client and {clients} clients; docker ps (whole CLI run); ms, req/s")
    print(f"{'target':8} {'p50':>7} {'p99':>7} {'+p50':>7} {'+p99':>7} {'req/s':>8} {'x':>5} | "
          f"{clients:>2}: {'p50':>7} {'p99':>7} {'req/s':>8} {'x':>5} | "
          f"ps {'p50':>7} {'p99':>7} {'+p50':>7}")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:8} {r['p50']:7.3f} {r['p99']:7.3f} {r['p50'] - direct['p50']:7.3f} "
            f"{r['p99'] - direct['p99']:7.3f} {r['rps1']:8.0f} {r['rps1'] / direct['rps1']:5.2f} | "
            f"    {r['p50n']:7.3f} {r['p99n']:7.3f} {r['rpsn']:8.0f} "
            f"{r['rpsn'] / direct['rpsn']:5.2f} | "
            f"   {r['ps50']:7.1f} {r['ps99']:7.1f} {r['ps50'] - direct['ps50']:7.1f}"
        )
    gw = results["gateway"]
    added50, added99 = gw["p50"] - direct["p50"], gw["p99"] - direct["p99"]
    ratio = min(gw["rps1"] / direct["rps1"], gw["rpsn"] / direct["rpsn"])
    print(
        f"goal: added p50 {added50:.3f} ms <= 1 ms: {'met' if added50 <= 1 else 'NOT met'}; "
        f"added p99 {added99:.3f} ms <= 5 ms: {'met' if added99 <= 5 else 'NOT met'}; "
        f"throughput {ratio:.2f}x >= 0.9x direct: {'met' if ratio >= 0.9 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
