"""Volumes as Ceph RBD images, reached from user space (librbd in QEMU and the tools).

The backend needs no ceph.conf and no keyring file: the monitors, the cephx
user and its key (raw bytes, as libvirt's `ceph` secret holds it) are all
it takes, and the key reaches each tool from a private 0600 file
(`rbd --keyfile`, librados' `keyfile` option in QEMU's `rbd:` filename,
QEMU's base64 secret object), never argv or the environment.

QEMU's LUKS driver creates the image itself while writing the header
(`qemu-img create -f luks rbd:pool/image…`); a try that fails on QEMU's
PBKDF calibration leaves an empty image behind, which `remove_leftover`
removes before the next try.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import ClassVar

from trustplane.api.volume_location import AnyLocation, Endpoint, RbdLocation, check_name
from trustplane.api.volume_spec import BackendKind
from trustplane.errors import ToolError, UsageError
from trustplane.tools import Executor, SecretFile
from trustplane.tools.command import Arg
from trustplane.volumes.access import NodeCredentials
from trustplane.volumes.backends.base import Backend

_TIMEOUT = 180.0


class RbdBackend(Backend):
    kind: ClassVar[BackendKind] = BackendKind.RBD
    qemu_creates_storage: ClassVar[bool] = True

    def __init__(
        self,
        pool: str,
        user: str,
        monitors: Sequence[Endpoint],
        key: bytes,
        executor: Executor | None = None,
    ) -> None:
        """`key`: the raw cephx key of `client.<user>` (`ceph auth get-key`, decoded)."""
        super().__init__(executor)
        try:
            self.pool = check_name(pool, "pool")
            self.user = check_name(user, "cephx user")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not monitors:
            raise UsageError("an RBD backend needs at least one monitor")
        if not key:
            raise UsageError("an RBD backend needs the cephx key of its user")
        self.monitors = tuple(monitors)
        self._key = key

    def __repr__(self) -> str:
        return f"RbdBackend(pool={self.pool!r}, user={self.user!r})"

    @property
    def mon_host(self) -> str:
        """librados' `mon_host`: the legacy (v1) addresses, which QEMU and libvirt use too."""
        return ",".join(f"v1:{m}" for m in self.monitors)

    def _keyfile(self, template: str = "{}") -> SecretFile:
        return SecretFile(base64.b64encode(self._key), template)

    def rbd(self, *args: Arg, timeout: float = _TIMEOUT) -> str:
        """`rbd ARGS` as the backend's user; the key from a private file."""
        argv: list[Arg] = [
            "rbd", "--conf", "/dev/null", "-m", self.mon_host,
            "--id", self.user, "--keyfile", self._keyfile(), *args,
        ]  # fmt: skip
        return self.executor.run(argv, timeout=timeout).text

    def credentials(self) -> NodeCredentials:
        return NodeCredentials(ceph_key=self._key)

    def location(self, name: str) -> RbdLocation:
        return RbdLocation(
            pool=self.pool, image=self.check_name(name), monitors=self.monitors, user=self.user
        )

    def exists(self, name: str) -> bool:
        return self.check_name(name) in self.rbd("ls", self.pool).split()

    def create(self, name: str, size: int) -> RbdLocation:
        self.check_size(size)
        location = self.location(name)
        try:
            self.rbd("create", location.spec, "--size", f"{size}B")
        except ToolError as exc:
            if "exists" in str(exc):
                raise UsageError(f"rbd volume {name} exists already") from None
            raise
        return location

    def delete(self, location: AnyLocation) -> None:
        image = _image(location)
        if image.image in self.rbd("ls", image.pool).split():
            self.rbd("rm", "--no-progress", image.spec)

    def size(self, location: AnyLocation) -> int:
        info = json.loads(self.rbd("info", _image(location).spec, "--format", "json"))
        return int(info["size"])

    def grow(self, location: AnyLocation, size: int) -> None:
        """`rbd resize` of the raw image (librbd's encryption not loaded: Ceph 16 would
        take the number as the raw size anyway, not add its LUKS header)."""
        self.check_size(size)
        image = _image(location)
        if self.size(image) < size:
            self.rbd("resize", "--no-progress", image.spec, "--size", f"{size}B")

    def in_use(self, location: AnyLocation) -> str | None:
        """The image's watchers (`rbd status`): every client that has it open (QEMU's
        librbd, `rbd map`, `rbd watch`) watches its header object until it closes it."""
        status = json.loads(self.rbd("status", _image(location).spec, "--format", "json"))
        watchers = status.get("watchers") or []
        if not watchers:
            return None
        who = ", ".join(
            f"client.{w.get('client', '?')} at {w.get('address', '?')}" for w in watchers[:3]
        )
        more = f" and {len(watchers) - 3} more" if len(watchers) > 3 else ""
        return f"watched by {who}{more}"

    def qemu_create_target(self, location: AnyLocation) -> Arg:
        """`rbd:POOL/IMAGE:id=…:mon_host=…:keyfile=F` (librados reads the key from F)."""
        image = _image(location)
        hosts = r"\;".join(f"v1:{m}".replace(":", r"\:") for m in self.monitors)
        return self._keyfile(
            f"rbd:{image.spec}:id={self.user}:conf=/dev/null:mon_host={hosts}:keyfile={{}}"
        )

    def remove_leftover(self, location: AnyLocation) -> None:
        self.delete(location)


def _image(location: AnyLocation) -> RbdLocation:
    if not isinstance(location, RbdLocation):
        raise UsageError(f"{location.describe()} is not an RBD volume")
    return location
