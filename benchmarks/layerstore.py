"""The layer store (qcow2 + LUKS chain): import, container start, cold read, view open.

One run, real tools, ratios against the reference in the same run:

(a) import of a ~1 GiB image of 3 uncompressed layers from an OCI layout
    into the store, against `docker load` of the same image (overlay2), and
    `ctr images import` into a private containerd's overlayfs snapshotter;
    peak Python memory
    (tracemalloc) of the import, and of one a quarter the size (flat?);
(b) container start (`store run IMAGE true`, 3-layer view + encrypted
    scratch + overlayfs + runc) against `docker run --rm IMAGE true`;
(c) cold sequential read of a 200 MB file from a 3-layer view, against the
    same file on the plain file system and the single-core AES-XTS bound
    (`openssl speed -evp aes-256-xts`, 16 KiB and 512-byte blocks);
(d) open time of a 3-layer view (key request, daemon, loop, mount);
(e) container start through containerd: `ctr run --rm --snapshotter
    trustplane` (the proxy snapshotter: the image's encrypted layers read-only,
    the writes on an encrypted scratch volume) against `ctr run --rm
    --snapshotter overlayfs`, the same image imported into one private
    containerd with both snapshotters: the first start (the layers opened)
    and the later ones (the layers open still, a scratch volume made ahead);
    and the import through each.

Keys come from a control plane started on loopback (embedded), as in use.

    python benchmarks/layerstore.py [--layer-mib 340] [--runs 3] [--keep DIR]
                                    [--containerd-only]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from trustplane.embedded.containerd import start_containerd
from trustplane.embedded.control_plane import start_control_plane
from trustplane.embedded.sample_images import busybox_rootfs_tar
from trustplane.layerstore import ControlPlaneKeys, ImportRequest, LayerStore
from trustplane.layerstore.snapshot_service import serve
from trustplane.layerstore.snapshotter import Snapshotter
from trustplane.oci import mediatypes
from trustplane.oci.layout import LayoutWriter
from trustplane.oci.reference import LayoutRef

BLOCK = os.urandom(4 << 20)
READ_FILE = "data/read-200M"
READ_SIZE = 200_000_000
TAG = "trustplane/layerstore-bench"


def data(size: int, seed: int) -> Iterator[bytes]:
    """`size` incompressible bytes, different per seed, made without holding them."""
    offset = (seed * 7919) % len(BLOCK)
    left = size
    while left:
        chunk = (BLOCK[offset:] + BLOCK[:offset])[: min(left, len(BLOCK))]
        left -= len(chunk)
        yield chunk


class _Stream(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def layer_tar(path: Path, files: dict[str, int], seed: int, base: bytes | None = None) -> None:
    """A layer tar written to `path`: `base` (a tar's members) and files of the given sizes."""
    with (
        path.open("wb") as out,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        if base is not None:
            with tarfile.open(fileobj=io.BytesIO(base)) as source:
                for member in source:
                    tar.addfile(member, source.extractfile(member) if member.isreg() else None)
        directory = tarfile.TarInfo("data")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        for index, (name, size) in enumerate(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = size, 0o644
            tar.addfile(info, _Stream(data(size, seed * 100 + index)))


def build_image(work: Path, layer_mib: int, read_size: int = READ_SIZE) -> tuple[Path, Path, int]:
    """An OCI layout and a docker-archive of the same 3-layer image; total bytes."""
    tars = []
    third = layer_mib << 20
    plans = [
        ({"data/a": third}, busybox_rootfs_tar()),
        ({"data/b": third}, None),
        ({READ_FILE: read_size, "data/c": max(0, third - read_size)}, None),
    ]
    for index, (files, base) in enumerate(plans):
        path = work / f"layer{index}.tar"
        layer_tar(path, files, index + int.from_bytes(os.urandom(2), "big"), base)
        tars.append(path)
    layout = work / "layout"
    writer = LayoutWriter(layout)
    descriptors, diff_ids = [], []
    for path in tars:
        digest = _sha256_file(path)
        staged = writer.staging / digest.replace(":", "-")
        path.rename(staged)
        writer.stage(digest, staged)
        descriptors.append(
            {"mediaType": mediatypes.OCI_LAYER, "digest": digest, "size": staged.stat().st_size}
        )
        diff_ids.append(digest)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": {
            "mediaType": mediatypes.OCI_CONFIG,
            "digest": writer.stage_bytes(config),
            "size": len(config),
        },
        "layers": descriptors,
    }
    writer.commit(json.dumps(manifest).encode(), mediatypes.OCI_MANIFEST, "v1")
    writer.close(True)
    archive = work / "image.docker.tar"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "-q", f"oci:{layout}:v1",
         f"docker-archive:{archive}:{TAG}:v1"],
        check=True,
    )  # fmt: skip
    return layout, archive, sum(d["size"] for d in descriptors)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout


def docker_load(archive: Path) -> float:
    subprocess.run(["docker", "rmi", "-f", f"{TAG}:v1"], capture_output=True, check=False)
    return timed(lambda: docker("load", "-q", "-i", str(archive)))


def ctr_import(archive: Path, work: Path) -> float:
    """`ctr images import` into a private containerd's overlayfs snapshotter."""
    daemon = start_containerd(work / "containerd")
    try:
        return timed(
            lambda: daemon.ctr("images", "import", "--snapshotter", "overlayfs", str(archive))
        )
    finally:
        daemon.stop()


def containerd_start(
    archive: Path, work: Path, keys: ControlPlaneKeys, runs: int
) -> dict[str, float | list[float]]:
    """(e): one containerd, the image imported with both snapshotters, runs timed."""
    ctd_work = Path(tempfile.mkdtemp(prefix="tp-bench-ctd-"))  # short: socket paths
    snapshotter = Snapshotter(work / "snapshotter", keys, repository="bench.example/containerd")
    server = serve(snapshotter, ctd_work / "snapshotter.sock")
    daemon = start_containerd(
        ctd_work / "containerd", proxy_snapshotters={"trustplane": ctd_work / "snapshotter.sock"}
    )
    try:
        ref = f"docker.io/{TAG}:v1"
        imports = {}
        for name in ("overlayfs", "trustplane"):
            imports[name] = timed(
                functools.partial(
                    daemon.ctr, "images", "import", "--snapshotter", name, str(archive)
                )
            )
        starts: dict[str, list[float]] = {"overlayfs": [], "trustplane": []}
        for run in range(runs + 1):
            for name, times in starts.items():
                container = f"bench-{name}-{run}"
                argv = ("run", "--rm", "--snapshotter", name, ref, container, "/bin/true")
                times.append(timed(functools.partial(daemon.ctr, *argv)))
        # The first start opens the image's layers; later ones find them open (the
        # shared view, kept VIEW_IDLE s after the last container) and a spare
        # scratch volume made ahead (warm.py).
        cold = starts["trustplane"][0]
        warm = statistics.median(starts["trustplane"][1:])
        theirs = statistics.median(starts["overlayfs"])
        daemon.ctr("images", "rm", "--sync", ref)
        return {
            "ctr_run_trustplane_cold_s": round(cold, 3),
            "ctr_run_trustplane_warm_s": round(warm, 3),
            "ctr_run_overlayfs_s": round(theirs, 3),
            "ratio_cold": round(cold / theirs, 2),
            "ratio_warm": round(warm / theirs, 2),
            "all_trustplane_s": [round(t, 3) for t in starts["trustplane"]],
            "all_overlayfs_s": [round(t, 3) for t in starts["overlayfs"]],
            "ctr_import_trustplane_s": round(imports["trustplane"], 2),
            "ctr_import_overlayfs_s": round(imports["overlayfs"], 2),
        }
    finally:
        daemon.stop()
        server.stop(grace=5).wait()
        snapshotter.close()
        shutil.rmtree(ctd_work, ignore_errors=True)


def drop_cache(*paths: Path) -> None:
    """Evict these files' (clean) pages from the page cache, nothing else's."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_rate(path: Path) -> float:
    """MB/s of one sequential read of `path` in 1 MiB requests."""
    start = time.perf_counter()
    total = 0
    with path.open("rb", buffering=0) as handle:
        while chunk := handle.read(1 << 20):
            total += len(chunk)
    return total / (time.perf_counter() - start) / 1e6


def aes_xts_bound(block: int) -> float:
    """MB/s of one core's AES-256-XTS decryption in `block`-byte units (openssl)."""
    out = subprocess.run(
        ["openssl", "speed", "-mr", "-elapsed", "-seconds", "2", "-bytes", str(block),
         "-decrypt", "-evp", "aes-256-xts"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"^\+F:\d+:[^:]+:([\d.]+)", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"cannot read openssl speed output: {out[-300:]}")
    return float(match.group(1)) / 1e6


@contextmanager
def traced_peak() -> Iterator[list[float]]:
    tracemalloc.start()
    peak: list[float] = []
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1] / (1 << 20))
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer-mib", type=int, default=340)
    parser.add_argument("--runs", type=int, default=3, help="repeats for start and open times")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: temporary)")
    parser.add_argument(
        "--containerd-only", action="store_true", help="(e) only: container start via containerd"
    )
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="trustplane-bench-layerstore-"))
    work.mkdir(parents=True, exist_ok=True)
    plane = start_control_plane(work / "plane")
    client = plane.admin()
    keys = ControlPlaneKeys(client)
    results: dict[str, object] = {}
    try:
        layout, archive, total = build_image(work, args.layer_mib)
        results["image_mib"] = round(total / (1 << 20))
        if not args.containerd_only:
            (work / "small").mkdir(exist_ok=True)
            small_layout, _, small_total = build_image(
                work / "small", max(1, args.layer_mib // 4), read_size=1 << 20
            )

            # (a) import
            docker_seconds = docker_load(archive)
            ctr_seconds = ctr_import(archive, work)
            store = LayerStore(work / "store")
            request = ImportRequest(
                source=LayoutRef(layout, "v1"), repository="bench.example/layerstore", size=4 << 30
            )
            with traced_peak() as peak:
                start = time.perf_counter()
                image = store.import_image(request, keys)
                import_seconds = time.perf_counter() - start
            small = ImportRequest(
                source=LayoutRef(small_layout, "v1"), repository="bench.example/small", size=4 << 30
            )
            with traced_peak() as small_peak:
                small_image = store.import_image(small, keys)
            results["import"] = {
                "store_s": round(import_seconds, 2),
                "docker_load_s": round(docker_seconds, 2),
                "ratio_vs_docker_load": round(import_seconds / docker_seconds, 2),
                "ctr_import_overlayfs_s": round(ctr_seconds, 2),
                "ratio_vs_ctr": round(import_seconds / ctr_seconds, 2),
                "peak_python_mib": round(peak[0], 1),
                "peak_python_mib_quarter_size": round(small_peak[0], 1),
                "quarter_size_mib": round(small_total / (1 << 20)),
                "disk_mib": round(sum(layer.disk_bytes for layer in image.layers) / (1 << 20)),
            }
            store.remove(small_image, keys)

            # (b) container start
            runs = range(args.runs)
            ours = [timed(lambda: store.run(image, 2, ["/bin/true"], keys)) for _ in runs]
            theirs = [timed(lambda: docker("run", "--rm", f"{TAG}:v1", "/bin/true")) for _ in runs]
            results["start"] = {
                "store_run_s": round(statistics.median(ours), 3),
                "docker_run_s": round(statistics.median(theirs), 3),
                "ratio": round(statistics.median(ours) / statistics.median(theirs), 2),
            }

            # (d) open time, and (c) the cold read from an open view
            opens = []
            for _ in range(args.runs):
                start = time.perf_counter()
                with store.view(image, 2, keys) as view:
                    opens.append(time.perf_counter() - start)
            layer_files = sorted((store.root / "qcow2" / "layers").glob("*.qcow2"))
            with store.view(image, 2, keys) as view:
                target = view.root / READ_FILE
                drop_cache(target, Path(view.device), *layer_files)
                view_rate = read_rate(target)
            plain = work / "plain-200M"
            with plain.open("wb") as out:
                for chunk in data(READ_SIZE, 99):
                    out.write(chunk)
            drop_cache(plain)
            plain_rate = read_rate(plain)
            bound_16k, bound_512 = aes_xts_bound(16384), aes_xts_bound(512)
            results["cold_read_200MB"] = {
                "view_MBps": round(view_rate),
                "plain_file_MBps": round(plain_rate),
                "aes_xts_16KiB_MBps": round(bound_16k),
                "aes_xts_512B_MBps": round(bound_512),
                "ratio_vs_plain": round(view_rate / plain_rate, 3),
                "ratio_vs_aes_xts_16KiB": round(view_rate / bound_16k, 3),
                "ratio_vs_aes_xts_512B": round(view_rate / bound_512, 3),
            }
            results["open_3_layer_view_ms"] = {
                "median": round(statistics.median(opens) * 1000),
                "all": [round(o * 1000) for o in opens],
            }
            store.remove(image, keys)

        # (e) container start through containerd's snapshots API
        results["containerd_start"] = containerd_start(archive, work, keys, args.runs)
    finally:
        subprocess.run(["docker", "rmi", "-f", f"{TAG}:v1"], capture_output=True, check=False)
        client.close()
        plane.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
