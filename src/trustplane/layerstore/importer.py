"""`store import`: an image from any transport into per-layer encrypted snapshots.

1. Resolve the image (any transport, oci/transport.py); open the wrapped key
   of each encrypted layer with the caller's keys or the KMS, bottom up, as
   `image decrypt` does: the store keeps the layers up to the first one the
   caller cannot open (its tier), never fewer than one.
2. On an attested node, measure the layers the manifest and config claim
   (the `Measurer`), so that the KMS may release keys to it.
3. Take an import lease (leases.py), have the control plane make a key
   chain for the image, get the top key, derive the rest.
4. Create every layer file at once, in parallel: a qcow2+LUKS create spends
   seconds of CPU calibrating its PBKDF, independent of the content.
5. Layer by layer: attach 0..k writable (k prepared), make the file system
   on layer 0, stream the blob through `LayerReader` (decrypt, decompress,
   hash) into the applier, unmount, detach, and commit layer k only if its
   verdict holds (HMAC, digests, size, diff_id).
6. Write the record. The image exists from this moment.

Any failure undoes everything: the layers made are removed and the chain is
destroyed (if the control plane cannot be reached, the lease keeps the
chain's id and a later recovery destroys it). After a crash the import's
lease, no longer locked, tells recovery the same.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trustplane.crypto.keys import UnwrapKey
from trustplane.errors import (
    DecryptionKeyError,
    IntegrityError,
    MalformedError,
    TrustplaneError,
    UsageError,
)
from trustplane.images.decrypt import OpenedLayer, Unwrapper, unwrap_all
from trustplane.images.resolve import resolve
from trustplane.layerstore.apply import apply_layer
from trustplane.layerstore.backend import ChainLink
from trustplane.layerstore.filesystem import make_filesystem, mount, unmount_if_mounted
from trustplane.layerstore.keys import ChainKeys, ChainRef, MeasuredLayer, Measurer
from trustplane.layerstore.leases import Lease
from trustplane.layerstore.reader import LayerReader
from trustplane.layerstore.records import StoredImage, StoredLayer, new_image_id, now
from trustplane.oci import mediatypes
from trustplane.oci.compression import DECOMPRESSION_ERRORS
from trustplane.oci.model import Descriptor, ImageConfig
from trustplane.oci.reference import DaemonRef, ImageRef, LayoutRef, RegistryRef, parse_registry
from trustplane.oci.transport import Endpoint, ImageSource, open_source
from trustplane.progress import SILENT, Reporter

if TYPE_CHECKING:
    from trustplane.layerstore.store import LayerStore

DEFAULT_SIZE = 16 << 30
"""Virtual size of every layer: sparse, so only what is written takes space."""


@dataclass(frozen=True)
class ImportRequest:
    source: ImageRef
    endpoint: Endpoint = field(default_factory=Endpoint)
    repository: str | None = None
    """HOST/REPO the policy knows the image by (default: from a registry or Docker name)."""
    name: str | None = None
    """What store commands call it (default REPOSITORY:TAG)."""
    tiers: dict[str, int] = field(default_factory=dict)
    """Names for views: {"contractor": 1}."""
    keys: Sequence[UnwrapKey] = ()
    remote: Sequence[Unwrapper] = ()
    platform: str | None = None
    size: int = DEFAULT_SIZE


def import_image(
    store: LayerStore,
    request: ImportRequest,
    keys: ChainKeys,
    reporter: Reporter = SILENT,
    measurer: Measurer | None = None,
) -> StoredImage:
    repository, name = _names(request)
    if request.size <= 0 or request.size % (1 << 20):
        raise UsageError("the layer size must be a positive number of MiB")
    source = open_source(request.source, request.endpoint)
    try:
        image = resolve(source, request.platform)
        layers = image.manifest.layers
        config = ImageConfig(image.config, f"{request.source}: config")
        if len(config.diff_ids) != len(layers):
            raise MalformedError(
                f"{request.source}: config lists {len(config.diff_ids)} layers, "
                f"manifest {len(layers)}"
            )
        for index, layer in enumerate(layers):
            if mediatypes.decrypted(layer.media_type) not in mediatypes.LAYERS:
                raise UsageError(f"layer {index} has media type {layer.media_type!r}")
        manifest_digest = "sha256:" + hashlib.sha256(image.manifest_bytes).hexdigest()
        if measurer is not None:
            # What the manifest and config claim, before any key is asked for
            # (an encrypted layer's plain digest is known once it is unwrapped).
            measurer.measure(
                repository,
                manifest_digest,
                [
                    MeasuredLayer(i, None if x.is_encrypted else x.digest, config.diff_ids[i])
                    for i, x in enumerate(layers)
                ],
            )
        opened, limit = (
            unwrap_all(layers, request.keys, request.remote, f"{request.source}")
            if any(layer.is_encrypted for layer in layers)
            else ({}, len(layers))
        )
        if limit < len(layers) and not opened:
            # Keys that open nothing would store what anyone gets without a key.
            raise DecryptionKeyError(
                f"{request.source}: none of the given keys can open layer {limit}, "
                "its lowest encrypted layer"
            )
        for tier_name, tier in request.tiers.items():
            if not 0 <= tier < limit:
                raise UsageError(f"tier {tier_name}={tier}: the image has layers 0..{limit - 1}")
        if measurer is not None and opened:
            measurer.measure(
                repository,
                manifest_digest,
                [
                    MeasuredLayer(i, state.private.digest, config.diff_ids[i])
                    for i, state in sorted(opened.items())
                ],
            )
        image_id = new_image_id()
        layer_ids = [f"{image_id}-{index}" for index in range(limit)]
        with Lease.take(
            store.lease_dir, {"kind": "import", "image": image_id, "layers": layer_ids}
        ) as lease:
            chain = keys.create_chain(repository, manifest_digest, limit)
            lease.update(chain={"server": chain.server, "id": chain.id})
            try:
                layer_keys = keys.layer_keys(chain, limit - 1)
                links = [ChainLink(x, k) for x, k in zip(layer_ids, layer_keys, strict=True)]
                stored = []
                with _Creator(store, links, request.size) as made:
                    for index in range(limit):
                        made.wait(index)
                        stored.append(
                            _fill(
                                store,
                                source,
                                layers[index],
                                config.diff_ids[index],
                                opened.get(index),
                                links[: index + 1],
                                index,
                                reporter,
                            )
                        )
                record = StoredImage(
                    id=image_id,
                    name=name,
                    repository=repository,
                    source=str(request.source),
                    manifest_digest=manifest_digest,
                    config=_b64(image.config),
                    layers=tuple(stored),
                    source_layers=len(layers),
                    chain_server=chain.server,
                    chain_id=chain.id,
                    tiers=dict(request.tiers),
                    backend=store.backend.name,
                    size=request.size,
                    created=now(),
                )
                store.records.save(record)
            except BaseException:
                _undo(store, layer_ids, chain, keys, lease)
                raise
    finally:
        source.close()
    return record


def _fill(
    store: LayerStore,
    source: ImageSource,
    layer: Descriptor,
    diff_id: str,
    opened: OpenedLayer | None,
    chain: list[ChainLink],
    index: int,
    reporter: Reporter,
) -> StoredLayer:
    """Apply one layer into its prepared snapshot and commit it if it authenticates."""
    what = f"{source.ref}: layer {index}"
    backend = store.backend
    with backend.attach(chain, writable=True) as attachment:
        if index == 0:
            make_filesystem(backend.executor, attachment.device, reads_zeros=backend.reads_zeros)
        target = attachment.lease.path / "fill"
        target.mkdir(mode=0o700)
        mount(backend.executor, attachment.device, target, writable=True)
        try:
            if index == 0:
                _drop_lost_found(target)
            with source.open_blob(layer) as blob:
                reader = LayerReader(
                    blob, layer, diff_id, opened, what, reporter.bar(f"layer {index}", layer.size)
                )
                try:
                    apply_layer(reader.tar, target)
                    plain = reader.verdict()
                except (TrustplaneError, *DECOMPRESSION_ERRORS) as exc:
                    # Altered content shows as a broken tar or stream first: say what it is.
                    reader.authenticate()
                    if isinstance(exc, TrustplaneError):
                        raise
                    raise IntegrityError(f"{what}: does not decompress ({exc})") from None
        finally:
            unmount_if_mounted(backend.executor, target)
    backend.commit(chain[-1].layer)
    info = backend.info(chain[-1].layer)
    return StoredLayer(
        index=index,
        layer=chain[-1].layer,
        digest=plain,
        diff_id=diff_id,
        media_type=mediatypes.decrypted(layer.media_type),
        encrypted_in_source=layer.is_encrypted,
        disk_bytes=info.disk_bytes if info else 0,
    )


class _Creator:
    """Makes every layer of an import in the background, bottom first.

    A qcow2+LUKS create spends seconds of CPU calibrating its PBKDF whatever
    the content, so the layers above are made while the ones below fill.
    Leaving the block waits for every create (a failed import then removes
    whole files, never one a create is still writing).
    """

    def __init__(self, store: LayerStore, links: list[ChainLink], size: int) -> None:
        workers = max(1, min(len(links), os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="layer-create")
        self._futures = [
            self._pool.submit(
                store.backend.create,
                link.layer,
                links[index - 1].layer if index else None,
                link.key,
                size,
            )
            for index, link in enumerate(links)
        ]

    def wait(self, index: int) -> None:
        self._futures[index].result()

    def __enter__(self) -> _Creator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)
        if exc_type is None:
            for future in self._futures:
                future.result()  # a failed create that nobody waited for yet


def _undo(
    store: LayerStore, layer_ids: list[str], chain: ChainRef, keys: ChainKeys, lease: Lease
) -> None:
    for layer in reversed(layer_ids):
        with contextlib.suppress(Exception):
            store.backend.remove(layer)
    try:
        keys.destroy_chain(chain)
    except Exception:
        # Keep the lease (and the chain's id in it): a later recovery destroys it.
        lease.update(layers=[], undone=True)
        lease.abandon()


def _drop_lost_found(root: Path) -> None:
    """mkfs's lost+found is not part of the image."""
    with contextlib.suppress(FileNotFoundError):
        (root / "lost+found").rmdir()


def _names(request: ImportRequest) -> tuple[str, str]:
    ref = request.source
    repository = request.repository
    tag = "latest"
    if isinstance(ref, RegistryRef):
        repository = repository or f"{ref.host}/{ref.repository}"
        tag = ref.tag or (ref.digest or "latest")
    elif isinstance(ref, DaemonRef) and not ref.name.startswith("sha256:"):
        parsed = parse_registry(ref.name)
        repository = repository or f"{parsed.host}/{parsed.repository}"
        tag = parsed.tag or parsed.digest or "latest"
    elif isinstance(ref, LayoutRef) and ref.tag:
        tag = ref.tag
    if repository is None:
        raise UsageError(
            f"{ref}: give --repository (HOST/REPO), the name the policy knows the image by"
        )
    separator = "@" if tag.startswith("sha256:") else ":"
    return repository, request.name or f"{repository}{separator}{tag}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
