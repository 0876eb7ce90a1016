"""50 concurrent clients through the gateway: no errors, and memory stays flat.

TRUSTPLANE_GATEWAY_LOAD_SECONDS sets the duration (default 10 s here, where
other suites share two cores; the issue's figure is 60 s).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_helpers import People, RunningGateway, make_people, start_gateway

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon

SECONDS = float(os.environ.get("TRUSTPLANE_GATEWAY_LOAD_SECONDS", "10"))
CLIENTS = 50


@pytest.fixture(scope="module")
def load_gateway(
    work_dir: Path, control_plane: RunningControlPlane, docker_daemon: DockerDaemon
) -> Iterator[RunningGateway]:
    yield from start_gateway(work_dir / "gateway-load", control_plane, docker_daemon)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_fifty_clients_no_errors_flat_memory(
    load_gateway: RunningGateway, control_plane: RunningControlPlane
) -> None:
    people: People = make_people(control_plane, "load")
    pid = load_gateway.process.pid
    assert pid is not None
    counts = {"ok": 0, "errors": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def client(stop_at: float) -> None:
        transport = httpx.HTTPTransport(uds=str(load_gateway.socket))
        headers = {"X-Trustplane-Token": people.user_token}
        with httpx.Client(transport=transport, base_url="http://docker", timeout=30) as http:
            while time.monotonic() < stop_at:
                path = "/v1.41/containers/json" if counts["ok"] % 2 else "/_ping"
                try:
                    response = http.get(path, headers=headers)
                    good = response.status_code == 200
                except httpx.HTTPError as exc:
                    good = False
                    response = None
                    errors.append(repr(exc))
                with lock:
                    counts["ok" if good else "errors"] += 1
                    if not good and response is not None:
                        errors.append(f"{response.status_code} {response.text[:200]}")

    def run(seconds: float) -> None:
        stop_at = time.monotonic() + seconds
        threads = [threading.Thread(target=client, args=(stop_at,)) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(min(3.0, SECONDS / 3))  # warm up: caches, allocator arenas
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append(rss_kib(pid))

    sampler = threading.Thread(target=sample)
    before = rss_kib(pid)
    counts.update(ok=0, errors=0)
    started = time.monotonic()
    sampler.start()
    run(SECONDS)
    done.set()
    sampler.join()
    elapsed = time.monotonic() - started
    after = rss_kib(pid)
    half = samples[len(samples) // 2] if samples else before
    print(
        f"{CLIENTS} clients, {elapsed:.1f} s: {counts['ok']} requests "
        f"({counts['ok'] / elapsed:.0f}/s), {counts['errors']} errors, "
        f"RSS {before} -> {half} (half-way) -> {after} KiB; samples {samples[::5]}"
    )
    assert counts["errors"] == 0, errors[:5]
    assert counts["ok"] > CLIENTS
    assert after - before < 8 * 1024, (before, after)  # flat: under 8 MiB growth in all
    assert after - half < 4 * 1024, samples  # and no steady climb in the second half
