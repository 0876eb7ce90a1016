"""Online extend: which attached volumes grow in place, and what the block resize is given.

An attached volume grows through the hypervisor (`virsh blockresize`, QEMU's
`block_resize` on the disk's top node), so the guest sees the new capacity
at once (virtio-blk's config change). What grows the storage is QEMU:

- QEMU's LUKS driver (engine `qemu`) takes the usable size and adds its
  payload offset to what it asks of the storage below: a file is truncated,
  an RBD image resized by librbd. The number given is the usable size.
- librbd's encryption (engine `librbd`): Ceph 16 resizes the raw image to
  the number it is given (it does not add the LUKS header, measured: a resize
  to 24 MiB of a LUKS2 image left 8 MiB usable), so the number given is the
  payload offset plus the usable size; QEMU then reads the new usable size
  back through librbd (measured: a guest sees exactly the size asked).

Not online: an iSCSI LUN (tgtd cannot grow a LUN while the VM's initiator
is logged in, and QEMU's iscsi driver refuses to grow one) and a logical
volume (`lvextend` runs on the storage host, dm-crypt's mapping on another):
those are extended offline (`Backend.grow`).
"""

from __future__ import annotations

from trustplane.api.volume_spec import BackendKind, Engine
from trustplane.errors import UnsupportedError

ONLINE = frozenset(
    {
        (BackendKind.FILE, Engine.QEMU),
        (BackendKind.RBD, Engine.QEMU),
        (BackendKind.RBD, Engine.LIBRBD),
    }
)


def check_online(backend: BackendKind, engine: Engine | None) -> None:
    """UnsupportedError unless an attached volume of this kind grows in place."""
    if engine is None or (backend, engine) not in ONLINE:
        raise UnsupportedError(
            f"extending an attached {backend} volume ({engine}) is not done: detach it and "
            "extend it offline"
        )


def block_resize_bytes(engine: Engine, header_bytes: int, size: int) -> int:
    """What `virsh blockresize` gets for `size` usable bytes (see the module's notes)."""
    if engine is Engine.LIBRBD:
        return header_bytes + size
    return size
