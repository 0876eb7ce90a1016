"""An encrypted volume opened on a host, and the tool messages of a wrong key.

Shared by the encryptors and the user-space opener (which the encryptors
use), so neither imports the other to reach them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from trustplane.errors import DecryptionKeyError, TrustplaneError

WRONG_KEY: dict[str, type[TrustplaneError]] = {
    # QEMU's LUKS driver (qemu-img, qemu-io, qemu-storage-daemon, a VM's QEMU)
    "Invalid password, cannot unlock any keyslot": DecryptionKeyError,
    # cryptsetup
    "No key available with this passphrase": DecryptionKeyError,
    # librbd
    "encryption load fail": DecryptionKeyError,
}
"""Tool messages that mean the key is wrong (mapped to DecryptionKeyError)."""


class OpenVolume(ABC):
    """An encrypted volume opened on a host: `path` reads and writes plaintext."""

    path: str
    """A block device (dm-crypt, a loop device) or a file (a FUSE export)."""

    @abstractmethod
    def close(self) -> None:
        """Undo the open: nothing of it (mapping, process, mount, key) is left. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
