"""QEMU block tools against the real storage components (Ceph, tgtd), for the tests.

Every call goes through the executor (trustplane.tools): keys reach QEMU only
as `--object secret,id=…,file=F` where F is a 0600 file in a private
directory that exists while the call runs (DESIGN.md, "QEMU LUKS"). The
passphrase of a volume key is the hex of the raw key, as OpenStack derives it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from trustplane.tools import QEMU_LUKS_PBKDF_HASH, QEMU_PBKDF_CALIBRATION, Executor, SecretFile

LUKS_MAGIC = b"LUKS\xba\xbe"
# Keys are random 256-bit values: a slow PBKDF buys nothing, and it is paid on every open.
ITER_TIME_MS = 10
EXECUTOR = Executor()


def passphrase(key: bytes) -> bytes:
    """The LUKS passphrase of a volume key: the hex of the raw key (OpenStack's way)."""
    return key.hex().encode("ascii")


def key_object(key: bytes, object_id: str = "s0") -> SecretFile:
    """QEMU's `--object secret` for a volume key, from a private 0600 file."""
    return SecretFile(passphrase(key), f"secret,id={object_id},file={{}}")


def qemu_img_create_luks(
    target: str, key: bytes, size: str, cleanup: Callable[[], None] | None = None
) -> None:
    """`qemu-img create -f luks` onto `target` (a file, rbd:… or iscsi://…).

    Retries on qemu-img's PBKDF calibration failure only; `cleanup` removes
    what a failed try left behind (an empty RBD image) before the next one.
    """
    retry = QEMU_PBKDF_CALIBRATION
    if cleanup is not None:
        retry = retry.with_cleanup(cleanup)
    argv = [
        "qemu-img", "create", "-q", "-f", "luks",
        "--object", key_object(key),
        "-o", f"key-secret=s0,hash-alg={QEMU_LUKS_PBKDF_HASH},iter-time={ITER_TIME_MS}",
        target, size,
    ]  # fmt: skip
    EXECUTOR.run(argv, retry=retry)


def qemu_io(image_opts: str, key: bytes, *commands: str | SecretFile) -> str:
    """`qemu-io --image-opts driver=luks,key-secret=s0,<image_opts> -c …`; returns stdout.

    A failure to open raises ToolError (QEMU's message, e.g. `Invalid
    password`); qemu-io reports a failed command on stdout with status 0,
    which fails here too.
    """
    argv: list[str | SecretFile] = [
        "qemu-io",
        "--object", key_object(key),
        "--image-opts", f"driver=luks,key-secret=s0,{image_opts}",
    ]  # fmt: skip
    for command in commands:
        argv += ["-c", command]
    out = EXECUTOR.run(argv).text
    assert " failed: " not in out, out
    return out


def qemu_io_write(image_opts: str, key: bytes, offset: int, data: bytes) -> None:
    """Write `data` (a multiple of 512 bytes) at `offset` through the LUKS layer.

    The data comes from a private file too (`write -s FILE`): it is the plaintext.
    """
    assert len(data) % 512 == 0
    command = SecretFile(data, f"write -s {{}} {offset} {len(data)}")
    out = qemu_io(image_opts, key, command)
    assert f"wrote {len(data)}/{len(data)} bytes" in out, out


_HEXDUMP_LINE = re.compile(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ?)+)", re.MULTILINE)


def qemu_io_read(image_opts: str, key: bytes, offset: int, length: int) -> bytes:
    """Read plaintext through the LUKS layer (`read -v`, parsed from its hex dump)."""
    out = qemu_io(image_opts, key, f"read -v {offset} {length}")
    data = b"".join(bytes.fromhex(m.group(1).replace(" ", "")) for m in _HEXDUMP_LINE.finditer(out))
    assert len(data) == length, out
    return data


def marker_block(marker: bytes, size: int = 4096) -> bytes:
    """`marker` repeated to fill `size` bytes: easy to find, impossible to miss."""
    return (marker * (size // len(marker) + 1))[:size]
