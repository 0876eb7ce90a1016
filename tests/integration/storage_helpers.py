"""QEMU block tools against the real storage components (Ceph, tgtd), for the tests.

Secrets reach the tools only as `--object secret,id=…,file=F` where F is a
0600 file in a private (0700) directory that is removed as soon as the call
returns (DESIGN.md, "QEMU LUKS"). The passphrase of a volume key is the hex
of the raw key, as OpenStack derives it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

LUKS_MAGIC = b"LUKS\xba\xbe"
# qemu-img create -f luks calibrates its PBKDF on thread CPU time, which this
# kernel counts in 4 ms ticks: it fails with this message now and then
# (DESIGN.md); retry on it only.
_CPU_USAGE_FLAKE = "Unable to get accurate CPU usage"
_CREATE_TRIES = 8
# Keys are random 256-bit values: a slow PBKDF buys nothing, and it is paid on every open.
ITER_TIME_MS = 10


@contextlib.contextmanager
def secret_files(**secrets: bytes) -> Iterator[dict[str, Path]]:
    """Each secret in a 0600 file of a fresh 0700 directory, all removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix="tp-secret-"))
    try:
        directory.chmod(0o700)
        paths = {}
        for name, value in secrets.items():
            path = directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(value)
            paths[name] = path
        yield paths
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def passphrase(key: bytes) -> bytes:
    """The LUKS passphrase of a volume key: the hex of the raw key (OpenStack's way)."""
    return key.hex().encode("ascii")


def run(argv: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def qemu_img_create_luks(
    target: str, key: bytes, size: str, cleanup: Callable[[], None] | None = None
) -> None:
    """`qemu-img create -f luks` onto `target` (a file, rbd:… or iscsi://…).

    Retries on the CPU-usage calibration failure only; `cleanup` removes what
    a failed try left behind (an empty RBD image) before the next one.
    """
    last = ""
    with secret_files(key=passphrase(key)) as files:
        for _ in range(_CREATE_TRIES):
            argv = [
                "qemu-img", "create", "-q", "-f", "luks",
                "--object", f"secret,id=s0,file={files['key']}",
                "-o", f"key-secret=s0,iter-time={ITER_TIME_MS}",
                target, size,
            ]  # fmt: skip
            result = run(argv)
            if result.returncode == 0:
                return
            last = result.stderr.strip()
            if _CPU_USAGE_FLAKE not in last:
                break
            if cleanup is not None:
                cleanup()
    raise AssertionError(f"qemu-img create -f luks {target} failed: {last}")


def qemu_io(image_opts: str, key: bytes, *commands: str) -> str:
    """`qemu-io --image-opts driver=luks,key-secret=s0,<image_opts> -c …`; returns stdout.

    qemu-io reports some failures on stdout with status 0; callers check the
    output, and an error line anywhere fails here.
    """
    with secret_files(key=passphrase(key)) as files:
        argv = [
            "qemu-io",
            "--object", f"secret,id=s0,file={files['key']}",
            "--image-opts", f"driver=luks,key-secret=s0,{image_opts}",
        ]  # fmt: skip
        for command in commands:
            argv += ["-c", command]
        result = run(argv)
    if result.returncode != 0 or result.stderr.strip() or " failed: " in result.stdout:
        raise AssertionError(f"qemu-io failed: {(result.stdout + result.stderr).strip()}")
    return result.stdout


def qemu_io_write(image_opts: str, key: bytes, offset: int, data: bytes) -> None:
    """Write `data` (a multiple of 512 bytes) at `offset` through the LUKS layer."""
    assert len(data) % 512 == 0
    with secret_files(data=data) as files:
        out = qemu_io(image_opts, key, f"write -s {files['data']} {offset} {len(data)}")
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
