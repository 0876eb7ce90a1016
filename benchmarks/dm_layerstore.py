"""The device-mapper layer store in the test guest, beside qcow2 on this host.

This machine has no device-mapper: the dm backend runs its dmsetup
sequences in the QEMU test guest (TCG, one emulated CPU) and its devices
reach this host over NBD (embedded/guest_export.py). So the dm figures are
the guest scenario's times, what the tests pay, not a dm host's; the qcow2
figures beside them are the same store operations on this host.

For each backend, over `--runs` rounds (median, and min..max):

- import of a 3-layer image (busybox and two layers of `--layer-mib` MiB
  of incompressible data, uncompressed; benchmarks/layerstore.py builds it);
- open + close of a view of layer 0, and of layers 0..2;
- a container from layers 0..2 (`store run IMAGE true`);
- removal (keys first, then the layers).

and the guest's boot time and one command's round trip through its
channel. Keys come from an in-process chain (the control plane's broker
costs the same for both backends).

    python benchmarks/dm_layerstore.py [--layer-mib 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from trustplane.crypto.key_chain import chain_below, new_chain
from trustplane.embedded.dm_guest import DmGuest, start_dm_guest
from trustplane.layerstore import DeviceMapperBackend, ImportRequest, LayerStore, Qcow2Backend
from trustplane.layerstore.backend import LayerBackend
from trustplane.layerstore.keys import ChainRef
from trustplane.oci.reference import LayoutRef
from trustplane.tools import Executor

sys.path.insert(0, str(Path(__file__).parent))
from layerstore import build_image  # the layer-store benchmark's image


class Keys:
    """`ChainKeys` in this process: the chain as the control plane would make it."""

    def __init__(self) -> None:
        self.chains: dict[str, list[bytes]] = {}

    def create_chain(self, repository: str, manifest_digest: str, layers: int) -> ChainRef:
        chain = ChainRef("local", os.urandom(8).hex())
        self.chains[chain.id] = new_chain(layers)
        return chain

    def layer_keys(self, chain: ChainRef, tier: int) -> list[bytes]:
        return chain_below(self.chains[chain.id][tier], tier)

    def destroy_chain(self, chain: ChainRef) -> None:
        self.chains.pop(chain.id, None)


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def one_round(store: LayerStore, layout: Path, add: Callable[[str, float], None]) -> None:
    keys = Keys()
    request = ImportRequest(LayoutRef(layout, "v1"), repository="bench.example/app", size=1 << 30)
    started = time.monotonic()
    image = store.import_image(request, keys)
    add("import (3 layers)", time.monotonic() - started)
    for tier in (0, 2):
        started = time.monotonic()
        with store.view(image, tier, keys):
            pass
        add(f"view of layers 0..{tier}: open + close", time.monotonic() - started)
    started = time.monotonic()
    result = store.run(image, 2, ["true"], keys)
    add("container from layers 0..2 (run true)", time.monotonic() - started)
    if result.exit_code != 0:
        raise SystemExit(f"the container exited with {result.exit_code}: {result.stderr!r}")
    started = time.monotonic()
    store.remove(image, keys)
    add("remove", time.monotonic() - started)


def rounds(
    name: str, backend_for: Callable[[Path], LayerBackend], layout: Path, work: Path, runs: int
) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}
    for run in range(runs):
        root = work / f"{name}-{run}"
        one_round(
            LayerStore(root, backend=backend_for(root)),
            layout,
            lambda what, seconds: figures.setdefault(what, []).append(seconds),
        )
    return figures


def report(name: str, figures: dict[str, list[float]]) -> None:
    print(f"\n{name}")
    for what, values in figures.items():
        spread = f"{min(values):.2f}..{max(values):.2f}"
        print(f"  {what:42s} {statistics.median(values):7.2f} s  ({spread}, n={len(values)})")


def guest_round_trip(guest: DmGuest) -> float:
    samples = [timed(lambda: guest.executor.run(["true"])) for _ in range(10)]
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer-mib", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tp-dm-bench-") as temp:
        work = Path(temp)
        layout, _, total = build_image(work, args.layer_mib, read_size=args.layer_mib << 19)
        print(f"image: 3 layers, {total / (1 << 20):.1f} MiB uncompressed")
        print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

        qcow2 = rounds(
            "qcow2", lambda root: Qcow2Backend(root / "qcow2", Executor()), layout, work, args.runs
        )
        report("qcow2 + LUKS on this host", qcow2)

        guest = start_dm_guest(work / "guest", disks=(4 << 30,) * args.runs)
        try:
            print(f"\ntest guest: boot {guest.boot_seconds:.2f} s, one command round trip "
                  f"{guest_round_trip(guest) * 1000:.0f} ms")  # fmt: skip
            disks = iter(guest.disks)

            def dm_backend(root: Path) -> LayerBackend:
                return DeviceMapperBackend(
                    root / "dm",
                    Executor(),
                    pool_device=next(disks).device,
                    dm_executor=guest.executor,
                    devices=guest.block_export(),
                )

            backends: list[LayerBackend] = []

            def tracked(root: Path) -> LayerBackend:
                backends.append(dm_backend(root))
                return backends[-1]

            dm = rounds("dm", tracked, layout, work, args.runs)
            report("device-mapper in the TCG test guest (devices over NBD to this host)", dm)
            for backend in backends:
                assert isinstance(backend, DeviceMapperBackend)
                backend.deactivate()
        finally:
            guest.stop()


if __name__ == "__main__":
    main()
