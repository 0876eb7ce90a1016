"""The embedded iSCSI target: file-backed LUNs that QEMU reaches from user space.

LUKS written onto a LUN by `qemu-img create -f luks … iscsi://…` (libiscsi,
no kernel initiator); data written through QEMU's LUKS layer reads back,
and the LUN's backing file holds none of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from storage_helpers import (
    EXECUTOR,
    LUKS_MAGIC,
    marker_block,
    qemu_img_create_luks,
    qemu_io_read,
    qemu_io_write,
)

from trustplane.embedded.tgtd import Lun, RunningTgtd
from trustplane.errors import ToolError, UsageError

LUN_SIZE = 64 * 1024 * 1024


@pytest.fixture
def lun(tgtd: RunningTgtd, tmp_path: Path) -> Iterator[Lun]:
    """A target with one 64 MiB file-backed LUN, removed after the test."""
    iqn = tgtd.add_target()
    yield tgtd.add_lun(iqn, tmp_path / "lun.img", size=LUN_SIZE)
    if iqn in tgtd.targets():
        tgtd.remove_target(iqn)


def _iscsi_opts(lun: Lun) -> str:
    return (
        f"file.driver=iscsi,file.transport=tcp,file.portal={lun.portal},"
        f"file.target={lun.iqn},file.lun={lun.lun}"
    )


def test_target_lists_its_lun_and_acl(tgtd: RunningTgtd, lun: Lun) -> None:
    shown = tgtd.show()
    assert lun.iqn in shown
    assert f"Backing store path: {lun.backing_file}" in shown
    assert "ALL" in shown.split("ACL information:", 1)[1]
    assert tgtd.portal.startswith("127.0.0.1:")
    info = EXECUTOR.run(["qemu-img", "info", "--output=json", lun.url]).text
    assert f'"virtual-size": {LUN_SIZE}' in info


def test_qemu_writes_luks_onto_the_lun_and_the_file_holds_no_plaintext(lun: Lun) -> None:
    key = secrets.token_bytes(32)
    # The payload must fit in the LUN minus the LUKS header (QEMU cannot grow a LUN).
    qemu_img_create_luks(lun.url, key, "60M")
    assert lun.backing_file.read_bytes()[:6] == LUKS_MAGIC

    marker = b"trustplane-iscsi-marker-" + secrets.token_hex(8).encode()
    block = marker_block(marker, 64 * 1024)
    opts = _iscsi_opts(lun)
    qemu_io_write(opts, key, 4096, block)
    assert qemu_io_read(opts, key, 4096, len(block)) == block
    assert marker not in lun.backing_file.read_bytes()

    with pytest.raises(ToolError, match="Invalid password"):
        qemu_io_read(opts, secrets.token_bytes(32), 0, 512)


def test_removed_lun_and_target_are_gone(tgtd: RunningTgtd, tmp_path: Path) -> None:
    iqn = tgtd.add_target()
    lun = tgtd.add_lun(iqn, tmp_path / "gone.img", size=8 * 1024 * 1024)
    EXECUTOR.run(["qemu-img", "info", lun.url])
    tgtd.remove_lun(iqn, lun.lun)
    with pytest.raises(ToolError, match="qemu-img"):
        EXECUTOR.run(["qemu-img", "info", lun.url])
    tgtd.remove_target(iqn)
    assert iqn not in tgtd.show()
    with pytest.raises(UsageError, match="no target"):
        tgtd.remove_target(iqn)
    with pytest.raises(UsageError, match="not an iSCSI qualified name"):
        tgtd.add_target("not an iqn")
