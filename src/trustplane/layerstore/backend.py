"""The interface every layer-store backend implements: one driver per backend.

A backend keeps *layers*: block-level snapshots, each made on top of its
parent and encrypted under a key of its own. It knows nothing of images,
tars or tiers; the store (and containerd's snapshotter) build on these
five operations:

- `create(layer, parent, key, size)`: a new, empty, *prepared* layer on top
  of a parent (or on nothing, for a base layer);
- `attach(chain, writable=...)`: layers bottom..top with their keys, opened
  as one block device. Writable only when the top is prepared; committed
  layers are never written again;
- `commit(layer)`: a prepared layer becomes durable and usable as a parent.
  Until then a crash may leave it half written, so nothing may use it;
- `remove(layer)`;
- `recover()`: undo what a dead process left attached (daemons, FUSE
  mounts, loop devices, device-mapper tables) under this backend's root.

Keys are handed in on every call and never stored by a backend.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from trustplane.errors import UsageError
from trustplane.layerstore.leases import Lease
from trustplane.tools import Executor

_LAYER_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")


def check_layer_id(layer: str) -> str:
    """Layer ids become file and device names: a short, safe alphabet only."""
    if not _LAYER_ID.fullmatch(layer) or ".." in layer:
        raise UsageError(f"invalid layer id {layer!r} (a-z, 0-9, '.', '_', '-'; at most 128)")
    return layer


@dataclass(frozen=True)
class ChainLink:
    """One layer of a chain to open, with the key that opens it."""

    layer: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class LayerInfo:
    layer: str
    parent: str | None
    committed: bool
    disk_bytes: int
    """What the layer takes on disk (its changed blocks and metadata)."""


class Attachment(ABC):
    """A chain opened as one block device; `close()` leaves nothing behind.

    `lease` is the owner's record of what this attachment holds. After a
    crash, `recover()` unmounts whatever is mounted on the device or under
    `lease.path` (where callers put their mount points) before detaching it.
    """

    device: str
    writable: bool
    lease: Lease

    @abstractmethod
    def close(self) -> None:
        """Detach and release; idempotent. Whatever is mounted on `device` must be gone."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LayerBackend(ABC):
    """Per-layer encrypted snapshots under `root`, run through one executor."""

    name: ClassVar[str]
    reads_zeros: ClassVar[bool]
    """A fresh layer reads back as zeros where nothing was written (so the
    file system need not zero its inode tables and journal)."""

    def __init__(self, root: Path, executor: Executor | None = None) -> None:
        self.root = root
        self.executor = executor or Executor()

    @abstractmethod
    def create(self, layer: str, parent: str | None, key: bytes, size: int) -> None:
        """A prepared, empty layer of `size` bytes on top of `parent`.

        The parent may be prepared still, or not made yet (an import makes all
        its layers at once); the new layer can be attached only once every
        layer below it is committed.
        """

    @abstractmethod
    def attach(self, chain: Sequence[ChainLink], *, writable: bool) -> Attachment:
        """Open layers bottom..top as one block device.

        A wrong key is `DecryptionKeyError`; a missing or uncommitted lower
        layer is `NotFoundError`. With `writable`, the top must be prepared.
        """

    @abstractmethod
    def scratch(self, size: int) -> Attachment:
        """An ephemeral encrypted volume (a container's writes), writable, unformatted.

        Its key is random and exists only in this process; closing the
        attachment destroys the volume.
        """

    @abstractmethod
    def commit(self, layer: str) -> None:
        """Make a prepared (and detached) layer durable and usable as a parent."""

    @abstractmethod
    def remove(self, layer: str) -> None:
        """Destroy a layer (prepared or committed); a missing one is no error."""

    @abstractmethod
    def layers(self) -> list[LayerInfo]:
        """Every layer this backend holds, committed and prepared."""

    @abstractmethod
    def raw_paths(self, layer: str) -> list[Path]:
        """Where a layer's bytes lie at rest, as someone with the disk reads them."""

    @abstractmethod
    def recover(self) -> list[str]:
        """Undo attachments whose owner died; returns what was cleaned, one line each."""

    def info(self, layer: str) -> LayerInfo | None:
        return next((info for info in self.layers() if info.layer == layer), None)
