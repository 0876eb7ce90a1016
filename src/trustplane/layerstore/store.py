"""The layer store: stored images, views by tier, containers, removal, recovery.

    root/
      images/ID.json       one record per stored image (records.py)
      leases/NAME/         what a live (or crashed) import or run holds (leases.py)
      qcow2/ or dm/        the backend's own files: layers/, run/ (its attachments);
                           which one: choice.py (host capability or configuration)

Opening a store recovers first: whatever a dead process left (a container,
mounts, loop devices, daemons, half-made layers, a key chain an import made)
is undone before anything else happens, so a crash never leaves state that a
later command would use.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from trustplane.errors import DecryptionKeyError, Forbidden, UsageError
from trustplane.layerstore.backend import Attachment, ChainLink, LayerBackend
from trustplane.layerstore.choice import BackendConfig, open_backend
from trustplane.layerstore.container import RunResult, delete_container, run_bundle, runtime_config
from trustplane.layerstore.filesystem import (
    force_unmount,
    make_filesystem,
    mount,
    unmount_if_mounted,
)
from trustplane.layerstore.importer import ImportRequest, import_image
from trustplane.layerstore.keys import ChainKeys, ChainRef, MeasuredLayer, Measurer
from trustplane.layerstore.leases import Lease, live_states, orphans, sweep_hidden
from trustplane.layerstore.records import Records, StoredImage
from trustplane.progress import SILENT, Reporter
from trustplane.tools import Executor

DEFAULT_ROOT = Path("/var/lib/trustplane/layerstore")
SCRATCH_SIZE = 4 << 30
"""A container's writable layer (sparse; only what it writes takes space)."""
RUN_TIMEOUT = 24 * 3600.0


@dataclass(frozen=True)
class View:
    """Layers 0..tier of an image, mounted read-only at `root`."""

    image: StoredImage
    tier: int
    root: Path
    device: str


class LayerStore:
    def __init__(
        self,
        root: Path,
        backend: LayerBackend | None = None,
        executor: Executor | None = None,
        *,
        config: BackendConfig | None = None,
        recover: bool = True,
    ) -> None:
        if any(c in os.fspath(root) for c in ",:\n"):
            # overlayfs and QEMU options separate fields with these.
            raise UsageError(f"{root}: a store path may not hold ',', ':' or a newline")
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.records = Records(root / "images")
        self.lease_dir = root / "leases"
        self.lease_dir.mkdir(exist_ok=True, mode=0o700)
        self.backend = backend or open_backend(root, config, executor)
        self.executor = self.backend.executor
        self.recovered: list[str] = self.recover() if recover else []

    # -- images ------------------------------------------------------------------------

    def images(self) -> list[StoredImage]:
        return self.records.all()

    def find(self, name: str) -> StoredImage:
        return self.records.find(name)

    def import_image(
        self,
        request: ImportRequest,
        keys: ChainKeys,
        reporter: Reporter = SILENT,
        measurer: Measurer | None = None,
    ) -> StoredImage:
        return import_image(self, request, keys, reporter, measurer)

    def remove(self, image: StoredImage, keys: ChainKeys) -> None:
        """Destroy the layer keys first (crypto-shredding), then the record and the files."""
        busy = [s for s in live_states(self.lease_dir) if s.get("image") == image.id]
        if busy:
            raise UsageError(f"{image.name} is in use ({busy[0].get('kind')}); stop that first")
        keys.destroy_chain(image.chain)
        self.records.delete(image.id)
        for layer in reversed(image.layers):
            self.backend.remove(layer.layer)

    # -- views ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def view(
        self,
        image: StoredImage,
        tier: int | str | None,
        keys: ChainKeys,
        *,
        measurer: Measurer | None = None,
        target: Path | None = None,
    ) -> Iterator[View]:
        """Layers 0..tier mounted read-only (at `target`, or inside the store)."""
        index = image.tier(tier)
        with self._lease(image, "view") as lease, self._attach(image, index, keys, measurer) as att:
            root = target or att.lease.path / "view"
            root.mkdir(mode=0o700, exist_ok=target is not None)
            lease.update(mount=os.fspath(root))
            mount(self.executor, att.device, root, writable=False, secure=True)
            try:
                yield View(image, index, root, att.device)
            finally:
                unmount_if_mounted(self.executor, root)

    def run(
        self,
        image: StoredImage,
        tier: int | str | None,
        command: Sequence[str],
        keys: ChainKeys,
        *,
        measurer: Measurer | None = None,
        env: Sequence[str] = (),
        timeout: float = RUN_TIMEOUT,
        scratch_size: int = SCRATCH_SIZE,
    ) -> RunResult:
        """A container from the tier's view: overlayfs over it, its writes encrypted.

        The writable layer is the backend's scratch volume (a random key that
        only this process holds), destroyed with the container.
        """
        container_id = f"trustplane-{uuid.uuid4().hex[:12]}"
        with (
            self.view(image, tier, keys, measurer=measurer) as view,
            self.backend.scratch(scratch_size) as scratch,
        ):
            make_filesystem(self.executor, scratch.device, reads_zeros=False, ephemeral=True)
            writes = scratch.lease.path / "writes"
            rootfs = scratch.lease.path / "rootfs"
            for directory in (writes, rootfs):
                directory.mkdir(mode=0o700)
            mount(self.executor, scratch.device, writes, writable=True)
            try:
                (writes / "upper").mkdir(mode=0o755)
                (writes / "work").mkdir(mode=0o700)
                self.executor.run(
                    [
                        "mount",
                        "-t",
                        "overlay",
                        "overlay",
                        "-o",
                        f"lowerdir={view.root},upperdir={writes / 'upper'},"
                        f"workdir={writes / 'work'}",
                        os.fspath(rootfs),
                    ]
                )
                try:
                    state = scratch.lease.path / "runc"
                    with Lease.take(
                        self.lease_dir,
                        {
                            "kind": "run",
                            "image": image.id,
                            "runc": os.fspath(state),
                            "container": container_id,
                        },
                    ):
                        config = runtime_config(
                            image.config_bytes(), rootfs, command, container_id[:63], env
                        )
                        return run_bundle(
                            self.executor,
                            scratch.lease.path / "bundle",
                            config,
                            container_id,
                            state,
                            timeout,
                        )
                finally:
                    unmount_if_mounted(self.executor, rootfs)
            finally:
                unmount_if_mounted(self.executor, writes)

    # -- recovery ------------------------------------------------------------------------

    def recover(self, keys: ChainKeys | None = None) -> list[str]:
        """Undo what dead processes left; returns one line per thing undone.

        Containers first (they hold the mounts), then the backend's
        attachments, then half-made imports (their layers; their key chain
        when `keys` can reach its control plane, else the lease waits for a
        later recovery that can), then layers that no record and no live
        lease claims.
        """
        done: list[str] = []
        imports: list[Lease] = []
        sweep_hidden(self.lease_dir)
        for lease in orphans(self.lease_dir):
            kind = lease.state.get("kind")
            if kind == "run" and lease.state.get("runc"):
                delete_container(
                    self.executor, Path(lease.state["runc"]), str(lease.state["container"])
                )
                done.append(f"container {lease.state['container']}: deleted")
            if kind == "view" and lease.state.get("mount"):
                force_unmount(self.executor, Path(lease.state["mount"]))
            if kind == "import":
                imports.append(lease)
            else:
                lease.release()
        done += self.backend.recover()
        for lease in imports:
            done.append(self._undo_import(lease, keys))
        done += self._sweep()
        return done

    def _undo_import(self, lease: Lease, keys: ChainKeys | None) -> str:
        image_id = str(lease.state.get("image"))
        if self.records.path(image_id).exists():
            # It died after writing the record: the import was complete.
            lease.release()
            return f"import {image_id}: complete"
        for layer in lease.state.get("layers", []):
            self.backend.remove(str(layer))
        lease.update(layers=[])
        chain = lease.state.get("chain")
        what = f"import {image_id}: layers removed"
        if chain:
            ref = ChainRef(str(chain["server"]), str(chain["id"]))
            if keys is None:
                lease.abandon()
                return what + f"; key chain {ref.id} awaits a recovery that can reach {ref.server}"
            try:
                keys.destroy_chain(ref)
            except Exception as exc:
                lease.abandon()
                return what + f"; key chain {ref.id} not destroyed yet ({exc})"
            what += f"; key chain {ref.id} destroyed"
        lease.release()
        return what

    def _sweep(self) -> list[str]:
        claimed = {layer for image in self.records.all() for layer in image_layers(image)}
        for state in live_states(self.lease_dir):
            claimed.update(str(layer) for layer in state.get("layers", []))
        done = []
        for info in self.backend.layers():
            if info.layer not in claimed:
                self.backend.remove(info.layer)
                done.append(f"layer {info.layer}: removed (no image holds it)")
        return done

    # -- helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lease(self, image: StoredImage, kind: str) -> Iterator[Lease]:
        with Lease.take(self.lease_dir, {"kind": kind, "image": image.id}) as lease:
            yield lease

    @contextlib.contextmanager
    def _attach(
        self, image: StoredImage, tier: int, keys: ChainKeys, measurer: Measurer | None
    ) -> Iterator[Attachment]:
        layers = image.layers[: tier + 1]
        if measurer is not None:
            measurer.measure(
                image.repository,
                image.manifest_digest,
                [MeasuredLayer(x.index, x.digest, x.diff_id) for x in layers],
            )
        try:
            layer_keys = keys.layer_keys(image.chain, tier)
        except Forbidden as exc:
            raise Forbidden(f"{image.name}: cannot open layer {tier}: {exc}") from None
        chain = [ChainLink(x.layer, k) for x, k in zip(layers, layer_keys, strict=True)]
        try:
            attachment = self.backend.attach(chain, writable=False)
        except DecryptionKeyError:
            raise DecryptionKeyError(
                f"{image.name}: the key of tier {tier} does not open its layers "
                "(a key of another image, or the layers were replaced)"
            ) from None
        with attachment:
            yield attachment


def image_layers(image: StoredImage) -> list[str]:
    return [layer.layer for layer in image.layers]
