"""What only the device-mapper backend has: its choice, its key check, its records.

The shared behaviour (views by tier, keys, plaintext at rest, crashes) is
tested on both backends in test_layerstore_backends.py and
test_layerstore_store.py. Here: the capability probe (this host has no
device-mapper, the test guest has), a wrong key told apart from a corrupt
layer (the kernel says the same of both), a chain re-assembled from its
records after every device is gone (as after a reboot), where the key
travels (a file, never argv; root reads it back from the kernel's table),
and a pool device that is not empty is refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_kinds import Backend, backend_of, data_extents

from trustplane.crypto.key_chain import new_chain
from trustplane.embedded.dm_guest import DmGuest
from trustplane.errors import (
    DecryptionKeyError,
    ExitCode,
    IntegrityError,
    UnsupportedError,
    UsageError,
)
from trustplane.layerstore import LayerStore, Qcow2Backend
from trustplane.layerstore.backend import ChainLink
from trustplane.layerstore.choice import BackendConfig, choose, open_backend
from trustplane.layerstore.devicemapper import (
    DeviceMapperBackend,
    _xts_key,
    device_mapper_problem,
)
from trustplane.layerstore.filesystem import make_filesystem, mount, unmount_if_mounted
from trustplane.tools import Executor

SIZE = 256 << 20
HOST_HAS_DM = "device-mapper" in Path("/proc/misc").read_text()
"""This machine's kernel has no device-mapper (DESIGN.md), though a
/dev/mapper/control node may exist (installing dmsetup makes one)."""
NO_DM = re.compile(
    r"^(no device-mapper \(/dev/mapper/control is missing\)"
    r"|device-mapper does not answer: .+)$"
)


@pytest.fixture
def dm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with backend_of("dm", tmp_path / "store", request) as under_test:
        yield under_test


def _layer(dm: Backend, index: int, keys: list[bytes], content: bytes, mnt: Path) -> None:
    """Layer `index` made, `file{index}` written into it, committed."""
    backend = dm.backend
    backend.create(f"l{index}", f"l{index - 1}" if index else None, keys[index], SIZE)
    links = [ChainLink(f"l{i}", keys[i]) for i in range(index + 1)]
    with backend.attach(links, writable=True) as attachment:
        if index == 0:
            make_filesystem(backend.executor, attachment.device, reads_zeros=True)
        mount(backend.executor, attachment.device, mnt, writable=True)
        try:
            (mnt / f"file{index}").write_bytes(content)
        finally:
            unmount_if_mounted(backend.executor, mnt)
    backend.commit(f"l{index}")


def _read_view(
    backend: DeviceMapperBackend | Qcow2Backend, keys: list[bytes], mnt: Path
) -> dict[str, bytes]:
    links = [ChainLink(f"l{i}", key) for i, key in enumerate(keys)]
    with backend.attach(links, writable=False) as attachment:
        mount(backend.executor, attachment.device, mnt, writable=False)
        try:
            return {p.name: p.read_bytes() for p in mnt.iterdir() if p.name != "lost+found"}
        finally:
            unmount_if_mounted(backend.executor, mnt)


def test_the_host_chooses_qcow2_and_the_guest_chooses_dm(dm_guest: DmGuest, tmp_path: Path) -> None:
    host, guest = Executor(), dm_guest.executor
    assert device_mapper_problem(guest) is None
    assert choose(BackendConfig(pool="/dev/vdz"), guest).kind == "dm"
    unpooled = choose(BackendConfig(), guest)
    assert (unpooled.kind, unpooled.why) == (
        "qcow2",
        "device-mapper is there, but no pool device is configured",
    )
    assert choose(BackendConfig(kind="qcow2", pool="/dev/vdz"), guest).kind == "qcow2"
    if not HOST_HAS_DM:  # this machine (DESIGN.md)
        problem = device_mapper_problem(host)
        assert problem is not None
        assert NO_DM.match(problem), problem
        chosen = choose(BackendConfig(pool="/dev/vdz"), host)
        assert (chosen.kind, chosen.why) == ("qcow2", problem)
        with pytest.raises(
            UnsupportedError,
            match=f"^the device-mapper backend cannot run here: {re.escape(problem)}$",
        ):
            choose(BackendConfig(kind="dm", pool="/dev/vdz"), host)
        assert isinstance(LayerStore(tmp_path / "host-store").backend, Qcow2Backend)
    with pytest.raises(UsageError, match="unknown layer-store backend 'lvm'"):
        BackendConfig(kind="lvm")
    with pytest.raises(UsageError, match="needs a pool device"):
        choose(BackendConfig(kind="dm"), guest)
    with dm_guest.scratch_disk() as disk:
        opened = open_backend(
            tmp_path / "guest-store",
            BackendConfig(pool=disk.device),
            dm_executor=guest,
            devices=dm_guest.block_export(),
        )
        assert isinstance(opened, DeviceMapperBackend)
        assert opened.root == tmp_path / "guest-store" / "dm"


def test_a_store_keeps_the_backend_its_layers_are_in(tmp_path: Path) -> None:
    root = tmp_path / "store"
    qcow2 = open_backend(root, BackendConfig(kind="qcow2"))
    qcow2.create("a", None, new_chain(1)[0], 1 << 20)
    with pytest.raises(UsageError, match=r"holds qcow2 layers; it cannot be opened as a dm store$"):
        open_backend(root, BackendConfig(kind="dm", pool="/dev/vdz"))
    assert isinstance(open_backend(root, BackendConfig(pool="/dev/vdz")), Qcow2Backend)
    qcow2.remove("a")


def test_the_cli_refuses_the_dm_backend_where_there_is_none_in_one_line(tmp_path: Path) -> None:
    if HOST_HAS_DM:
        pytest.fail("this test is for a host without device-mapper (DESIGN.md: this machine)")
    store = ["--store", os.fspath(tmp_path / "store"), "--backend", "dm", "--pool", "/dev/sdz"]
    result = subprocess.run(
        [sys.executable, "-m", "trustplane", "store", "import", f"oci:{tmp_path}", *store],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == ExitCode.UNSUPPORTED, result.stderr
    prefix = "trustplane: error: the device-mapper backend cannot run here: "
    assert result.stderr.startswith(prefix), result.stderr
    assert NO_DM.match(result.stderr[len(prefix) :].removesuffix("\n")), result.stderr
    assert result.stderr.count("\n") == 1


def test_a_wrong_key_is_told_from_a_corrupt_layer(dm: Backend, tmp_path: Path) -> None:
    """Under a wrong key and over a broken COW alike the kernel says `Invalid or
    corrupt snapshot`; the record's key check tells them apart, before any
    device is made."""
    keys = new_chain(2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for index in range(2):
        _layer(dm, index, keys, f"content of layer {index}".encode(), mnt)
    backend = dm.backend
    assert isinstance(backend, DeviceMapperBackend)

    with pytest.raises(DecryptionKeyError, match=r"^the key given for layer l1 does not open it$"):
        backend.attach([ChainLink("l0", keys[0]), ChainLink("l1", keys[0])], writable=False)
    assert dm.leftovers() == []

    # Someone with the disk overwrites layer 1's COW header (its ciphertext).
    record = json.loads((backend.root / "layers" / "l1.json").read_bytes())
    (pool,) = [n for n in backend.device_names() if n.endswith("-pool")]
    guest = backend.dm
    guest.run(
        [
            "dmsetup",
            "create",
            "tpcorrupt",
            "--table",
            f"0 {record['cow_sectors']} thin /dev/mapper/{pool} {record['thin_id']}",
        ]
    )
    try:
        guest.run(
            [
                "dd",
                "if=/dev/urandom",
                "of=/dev/mapper/tpcorrupt",
                "bs=4096",
                "count=1",
                "conv=fsync",
            ]
        )
    finally:
        guest.run(["dmsetup", "remove", "tpcorrupt"])
    with pytest.raises(IntegrityError) as caught:
        backend.attach([ChainLink("l0", keys[0]), ChainLink("l1", keys[1])], writable=False)
    assert str(caught.value) == (
        "layer l1: its copy-on-write store is not a valid snapshot although the key is right "
        "(corrupt, or never initialised)"
    )
    assert dm.leftovers() == []
    assert _read_view(backend, keys[:1], mnt) == {"file0": b"content of layer 0"}


def test_a_chain_is_reassembled_from_its_records_after_a_reboot(
    dm: Backend, tmp_path: Path
) -> None:
    """Every device goes (the pool's too), as at a reboot: the records, the pool's
    metadata and the COWs on the disk are all a new process needs, with the keys."""
    keys = new_chain(2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    contents = [os.urandom(8).hex().encode() * 1000 for _ in range(2)]
    for index in range(2):
        _layer(dm, index, keys, contents[index], mnt)
    backend = dm.backend
    assert isinstance(backend, DeviceMapperBackend)
    backend.deactivate()
    assert backend.device_names() == []

    again = dm.reopen()
    assert isinstance(again, DeviceMapperBackend)
    assert again.pool_device == backend.pool_device, "remembered in pool.json"
    assert _read_view(again, keys, mnt) == {"file0": contents[0], "file1": contents[1]}
    assert {(i.layer, i.parent, i.committed) for i in again.layers()} == {
        ("l0", None, True),
        ("l1", "l0", True),
    }
    # What the records keep: ids, sizes, a one-way check; no key in any form.
    for path in (backend.root / "layers").iterdir():
        record = path.read_bytes()
        assert set(json.loads(record)) >= {"thin_id", "sectors", "cow_sectors", "chunk_sectors"}
        for key in keys:
            for form in (key.hex(), _xts_key(key).hex()):
                assert form.encode() not in record


def test_the_key_reaches_dmsetup_in_a_file_and_root_reads_it_back_from_the_kernel(
    dm: Backend, tmp_path: Path
) -> None:
    """Never in argv, on either side; but the table of a dm-crypt device holds its
    key, and root on the host reads it with `dmsetup table --showkeys` (README,
    "what is not protected")."""
    keys = new_chain(1)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _layer(dm, 0, keys, b"x", mnt)
    backend = dm.backend
    assert isinstance(backend, DeviceMapperBackend)
    xts = _xts_key(keys[0]).hex()
    with backend.attach([ChainLink("l0", keys[0])], writable=False):
        guest = backend.dm
        (crypt,) = [n for n in backend.device_names() if n.endswith("-0c")]
        assert xts not in guest.run(["ps", "-o", "args"]).text
        hidden = guest.run(["dmsetup", "table", crypt]).text
        assert re.search(r" crypt aes-xts-plain64 0{128} 0 ", hidden), hidden
        shown = guest.run(["dmsetup", "table", "--showkeys", crypt]).text
        assert f" crypt aes-xts-plain64 {xts} 0 " in shown
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    assert xts.encode() not in (entry / "cmdline").read_bytes()
                except OSError:
                    continue
    assert dm.leftovers() == []


def test_a_pool_device_that_is_not_empty_is_refused(dm_guest: DmGuest, tmp_path: Path) -> None:
    marker = b"somebody's filesystem " + os.urandom(8).hex().encode()
    with dm_guest.scratch_disk() as disk:
        dm_guest.executor.run(
            ["dd", f"of={disk.device}", "bs=512", "seek=2", "conv=fsync,notrunc"],
            stdin=marker + b"\0" * (512 - len(marker)),
        )
        backend = DeviceMapperBackend(
            tmp_path / "dm",
            pool_device=disk.device,
            dm_executor=dm_guest.executor,
            devices=dm_guest.block_export(),
        )
        with pytest.raises(UsageError, match=f"^{disk.device} is not empty"):
            backend.create("a", None, new_chain(1)[0], SIZE)
        assert not (tmp_path / "dm" / "pool.json").exists()
        assert backend.layers() == []
        assert any(marker in data for _, data in data_extents(disk.path))


def test_a_full_pool_refuses_the_layer_being_written(dm_guest: DmGuest, tmp_path: Path) -> None:
    """A thin pool over-commits: an 80 MiB pool takes a 256 MiB layer. Writing past
    what the pool holds fails at once (error_if_no_space), the snapshot turns
    invalid, and closing the layer says so; it is never committed."""
    guest = dm_guest.executor
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with dm_guest.scratch_disk() as disk:
        guest.run(
            ["dmsetup", "create", "tpsmall", "--table", f"0 {80 << 11} linear {disk.device} 0"]
        )
        try:
            backend = DeviceMapperBackend(
                tmp_path / "dm",
                Executor(timeout=120),
                pool_device="/dev/mapper/tpsmall",
                dm_executor=guest,
                devices=dm_guest.block_export(),
            )
            key = new_chain(1)[0]
            backend.create("big", None, key, SIZE)
            attachment = backend.attach([ChainLink("big", key)], writable=True)
            try:
                make_filesystem(backend.executor, attachment.device, reads_zeros=True)
                mount(backend.executor, attachment.device, mnt, writable=True)
                with (mnt / "data").open("wb") as sink:
                    for _ in range(120):
                        sink.write(os.urandom(1 << 20))
            except OSError:
                pass  # the file system may see the errors first; the check is at close
            finally:
                subprocess.run(["umount", os.fspath(mnt)], check=False)
            with pytest.raises(IntegrityError) as caught:
                attachment.close()
            assert re.fullmatch(
                r"layer big: its snapshot became invalid while it was written \(.+\); "
                r"is the thin pool full\?",
                str(caught.value),
            ), caught.value
            info = backend.info("big")
            assert info is not None
            assert not info.committed
            backend.remove("big")
            assert backend.layers() == []
            left = [
                n for n in backend.device_names() if not n.endswith(("-pool", "-data", "-meta"))
            ]
            assert left == []
            backend.deactivate()
        finally:
            guest.run(["dmsetup", "remove", "tpsmall"], check=False)
