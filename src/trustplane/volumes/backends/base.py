"""The one base class of every storage backend (os-brick's shape).

A backend manages raw storage on the storage side: it creates a volume of
a given size, deletes it, and locates it (`Location`: what QEMU and libvirt
need to reach it). It knows nothing about encryption; an encryptor formats
what a backend created (`trustplane.volumes.encryptors`).

`grow` makes the raw storage larger for an extend (the encryptor checks
what the LUKS layer then reads: `Encryptor.extend`). `in_use` says who uses
storage right now (a process, a VM, an initiator, a Ceph client), asked before
storage the service did not make is adopted and destroyed (encrypt in place).

Some storage is made by QEMU itself while it writes the LUKS header
(`qemu-img create -f luks` onto `rbd:pool/image` creates the image;
onto a file path, the file): such a backend says `qemu_creates_storage`
and gives the target name QEMU creates (`qemu_create_target`) and a
cleanup for a failed try (`remove_leftover`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from trustplane.api.volume_location import AnyLocation, check_name
from trustplane.api.volume_spec import BackendKind
from trustplane.errors import NotFoundError, UnsupportedError, UsageError
from trustplane.tools import Executor
from trustplane.tools.command import Arg
from trustplane.volumes.access import NodeCredentials, raw_reader
from trustplane.volumes.header import RawReader

SECTOR = 512


class Backend(ABC):
    """Raw storage for volumes: create(size) / delete / locate."""

    kind: ClassVar[BackendKind]
    qemu_creates_storage: ClassVar[bool] = False
    """`qemu-img create -f luks TARGET` makes the storage (file, rbd) rather than
    formatting storage that exists (an iSCSI LUN, a logical volume)."""

    def __init__(self, executor: Executor | None = None) -> None:
        self.executor = executor or Executor()

    @staticmethod
    def check_name(name: str) -> str:
        """A volume name the backend can use in paths, IQNs, LVM and RBD names."""
        try:
            return check_name(name, "volume name")
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    @staticmethod
    def check_size(size: int) -> int:
        """Raw sizes are whole sectors (a usable size is whole MiB: `spec.check_volume_size`)."""
        if size <= 0 or size % SECTOR:
            raise UsageError(f"a raw volume size is a positive multiple of 512 bytes, not {size}")
        return size

    @abstractmethod
    def create(self, name: str, size: int) -> AnyLocation:
        """Make raw storage of exactly `size` bytes; UsageError if `name` exists."""

    @abstractmethod
    def delete(self, location: AnyLocation) -> None:
        """Destroy the storage. Idempotent: a volume already gone is not an error."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """True when storage named `name` exists."""

    @abstractmethod
    def location(self, name: str) -> AnyLocation:
        """Where `name` is or would be, without looking."""

    @abstractmethod
    def size(self, location: AnyLocation) -> int:
        """The raw size in bytes."""

    def grow(self, location: AnyLocation, size: int) -> None:
        """Grow the raw storage to `size` bytes (an offline extend: nobody uses it).

        Storage of `size` bytes or more is left as it is (a retry after a crash,
        or an allocation rounded up); nothing ever shrinks. Default: not done."""
        raise UnsupportedError(f"growing {self.kind} volumes is not done")

    def in_use(self, location: AnyLocation) -> str | None:
        """Who uses the storage right now, in a few words (None: nobody seen).

        A look, not a lock: what starts using it afterwards is not seen, so callers
        look again right before an irreversible step. Default: not known, which is
        refused rather than taken for unused."""
        raise UnsupportedError(f"telling whether {self.kind} storage is in use is not done")

    def locate(self, name: str) -> AnyLocation:
        """Where volume `name` is; NotFoundError when there is no such storage."""
        if not self.exists(self.check_name(name)):
            raise NotFoundError(f"{self.kind} volume {name} does not exist")
        return self.location(name)

    def credentials(self) -> NodeCredentials:
        """What a host needs besides the location to reach this backend's volumes."""
        return NodeCredentials()

    def reader(self, location: AnyLocation) -> RawReader:
        """Reads the raw (encrypted) bytes of a volume of this backend."""
        return raw_reader(location, self.executor, self.credentials())

    def qemu_create_target(self, location: AnyLocation) -> Arg:
        """The filename `qemu-img create` makes (a backend with `qemu_creates_storage`)."""
        raise UnsupportedError(f"QEMU does not create {self.kind} volumes")

    def qemu_format_target(self, location: AnyLocation) -> Arg:
        """The filename `qemu-img create -f luks` formats in place (existing storage)."""
        raise UnsupportedError(f"QEMU does not format existing {self.kind} volumes in place")

    def before_format_retry(self, location: AnyLocation) -> None:
        """Undo what a failed in-place `qemu-img create -f luks` did, before it runs again.

        Default: nothing (a LUN or a logical volume is written, not deleted).
        """
        return

    def remove_leftover(self, location: AnyLocation) -> None:
        """Remove what a failed `qemu-img create` left (an empty image). Default: delete."""
        self.delete(location)
