"""Containers on encrypted volumes: `docker run` start time and sequential I/O.

Starts its own control plane (a file backend), a dockerd of its own whose
plugin directory holds `trustplane volume-plugin`, and measures against a
`local` volume of the same dockerd. Both sides live in tmpfs (the file
backend's volumes and dockerd's data root, where local volumes are), so
neither measures the shared disk:

- `docker volume create` of a trustplane volume (the control plane's
  create: KMS order, `qemu-img create -f luks`; then the key release and
  mkfs.ext4 through the user-space open);
- `docker run --rm -v VOLUME:/data busybox true`, p50 of N runs each:
  the trustplane volume is opened (key release, header check,
  qemu-storage-daemon, loop device, mount) and closed again on every run,
  since no other container holds it;
- sequential write (dd 1 MiB blocks, `conv=fsync`) and read of SIZE MiB
  inside the container, each run's time minus the same `true` run's p50
  (so container start and the open are left out).

One run, ratios reported; no thresholds. The machine may be shared: the
figures of one run are comparable with each other, not across runs.

    python benchmarks/volume_plugin.py [--runs 7] [--size-mib 256]

benchmarks/volumes.py runs the same (`measure`, `summary`) as its container section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from trustplane.embedded.control_plane import start_control_plane
from trustplane.embedded.dockerd import DockerDaemon, ensure_dockerd, make_shared, unmake_shared
from trustplane.embedded.sample_images import import_busybox_base
from trustplane.embedded.volume_plugin import (
    FILE_BACKEND,
    PluginProcess,
    register_volume_node,
    replace_policy,
    volume_backends_env,
    volume_node_rules,
)

TAG = "trustplane/busybox:volume-bench"
NODE = "bench-docker"


def docker(daemon: DockerDaemon, *args: str, timeout: float = 600) -> float:
    """Run the docker CLI against `daemon`; its wall time (it must succeed)."""
    start = time.monotonic()
    subprocess.run(
        ["docker", "--host", daemon.base_url, *args],
        check=True, capture_output=True, timeout=timeout,
    )  # fmt: skip
    return time.monotonic() - start


@contextmanager
def docker_host(top: Path, scratch: Path) -> Iterator[DockerDaemon]:
    """Control plane + node + policy + volume type, the plugin, its own dockerd."""
    with ExitStack() as stack:
        plane = start_control_plane(top / "cp", env=volume_backends_env(scratch / "volumes"))
        stack.callback(plane.stop)
        with plane.admin() as admin:
            key = register_volume_node(admin, top, NODE)
            admin.create_volume_type("secure", FILE_BACKEND)
        policy = (plane.data_dir / "policy.yaml").read_text()
        replace_policy(plane, policy + volume_node_rules(NODE))
        root, plugins = top / "root", top / "plugins"
        make_shared(root)
        stack.callback(unmake_shared, root)
        plugins.mkdir(mode=0o700)
        plugin = PluginProcess(plane, NODE, key, plugins / "trustplane.sock", root, top / "work")
        plugin.start()
        stack.callback(plugin.stop)
        daemon = ensure_dockerd(
            top / "work", socket=top / "d.sock", state_dir=scratch / "state",
            private_network=True, plugin_dir=plugins,
        )  # fmt: skip
        stack.callback(daemon.stop)
        client = daemon.client()
        try:
            import_busybox_base(client, TAG)
        finally:
            client.close()
        yield daemon


def run_p50(daemon: DockerDaemon, volume: str, runs: int, *command: str) -> float:
    times = [
        docker(daemon, "run", "--rm", "--network", "none", "-v", f"{volume}:/data", TAG, *command)
        for _ in range(runs)
    ]
    return statistics.median(times)


def measure(runs: int, size: int) -> dict[str, float]:
    """Every figure of the module docstring, for `runs` starts and SIZE MiB of I/O."""
    top = Path(tempfile.mkdtemp(prefix="tpvb-", dir="/tmp"))
    scratch = Path(tempfile.mkdtemp(prefix="tpvb-", dir="/dev/shm"))
    results: dict[str, float] = {}
    try:
        with docker_host(top, scratch) as daemon:
            results["create_trustplane_s"] = docker(
                daemon, "volume", "create", "-d", "trustplane", "--opt", "type=secure",
                "--opt", f"size={size + 64}M", "enc",
            )  # fmt: skip
            results["create_local_s"] = docker(daemon, "volume", "create", "plain")
            write = f"dd if=/dev/zero of=/data/f bs=1M count={size} conv=fsync 2>/dev/null"
            read = "dd if=/data/f of=/dev/null bs=1M 2>/dev/null"
            for label, volume in (("trustplane", "enc"), ("local", "plain")):
                start = run_p50(daemon, volume, runs, "true")
                results[f"run_{label}_p50_s"] = start
                written = run_p50(daemon, volume, 3, "sh", "-c", write)
                results[f"write_{label}_mib_s"] = size / max(written - start, 1e-3)
                readback = run_p50(daemon, volume, 3, "sh", "-c", read)
                results[f"read_{label}_mib_s"] = size / max(readback - start, 1e-3)
                docker(daemon, "run", "--rm", "-v", f"{volume}:/data", TAG, "rm", "/data/f")
            docker(daemon, "volume", "rm", "enc", "plain")
    finally:
        subprocess.run(["umount", "-R", str(scratch / "state" / "data")], capture_output=True,
                       check=False)  # fmt: skip
        shutil.rmtree(top, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def summary(results: dict[str, float], runs: int, size: int) -> list[str]:
    """The report lines for `measure`'s results."""
    added = results["run_trustplane_p50_s"] - results["run_local_p50_s"]
    lines = [
        f"docker volume create: trustplane {results['create_trustplane_s']:.2f} s "
        f"({size + 64} MiB), local {results['create_local_s']:.2f} s",
        f"docker run -v (p50 of {runs}): trustplane {results['run_trustplane_p50_s']:.3f} s, "
        f"local {results['run_local_p50_s']:.3f} s, added {added:.3f} s",
    ]
    for kind in ("write", "read"):
        encrypted, plain = results[f"{kind}_trustplane_mib_s"], results[f"{kind}_local_mib_s"]
        lines.append(
            f"sequential {kind} in the container ({size} MiB): trustplane {encrypted:.0f} "
            f"MiB/s, local {plain:.0f} MiB/s ({encrypted / plain:.2f}x)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--size-mib", type=int, default=256)
    options = parser.parse_args()
    results = measure(options.runs, options.size_mib)
    print("\n".join(summary(results, options.runs, options.size_mib)))
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
