"""Both layer-store backends against the real tools, one behaviour.

qcow2 + LUKS chains run on this host (qemu-img, qemu-storage-daemon, FUSE,
loop); device-mapper snapshots over dm-crypt COWs run their dmsetup
sequences in the QEMU test guest, whose devices reach this host over NBD
(backend_kinds.py). Every test runs for both.

The attacker reads the raw bytes at rest (the qcow2 files; the guest's
virtio disk image), holds keys of other chains or of lower layers, or kills
the process that holds a chain open.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from backend_kinds import KINDS, Backend, backend_of, data_extents
from store_checks import leftovers

from trustplane.crypto.key_chain import new_chain
from trustplane.errors import DecryptionKeyError, NotFoundError, UsageError
from trustplane.layerstore.backend import ChainLink, LayerBackend
from trustplane.layerstore.devicemapper import _xts_key
from trustplane.layerstore.filesystem import make_filesystem, mount, unmount_if_mounted
from trustplane.layerstore.qcow2 import backing_file

SIZE = 1 << 30
BIG = 6 << 20


@dataclass(frozen=True)
class Chain:
    under_test: Backend
    keys: list[bytes]
    markers: list[bytes]

    @property
    def backend(self) -> LayerBackend:
        return self.under_test.backend

    @property
    def kind(self) -> str:
        return self.under_test.kind

    def links(self, upto: int, keys: list[bytes] | None = None) -> list[ChainLink]:
        keys = keys or self.keys
        return [ChainLink(f"l{i}", keys[i]) for i in range(upto + 1)]


def _marker(index: int) -> bytes:
    return f"layer-{index}-marker-{os.urandom(6).hex()}".encode()


@pytest.fixture(scope="module", params=KINDS)
def chain(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chain]:
    """Three committed layers; layer k adds file k (layer 1 also 6 MiB of data)."""
    root = tmp_path_factory.mktemp("chain")
    with backend_of(request.param, root / "store", request) as under_test:
        yield from _build_chain(under_test, root)


def _build_chain(under_test: Backend, root: Path) -> Iterator[Chain]:
    backend = under_test.backend
    keys = new_chain(3)
    markers = [_marker(i) for i in range(3)]
    mnt = root / "mnt"
    mnt.mkdir()
    for index in range(3):
        backend.create(f"l{index}", f"l{index - 1}" if index else None, keys[index], SIZE)
        links = [ChainLink(f"l{i}", keys[i]) for i in range(index + 1)]
        with backend.attach(links, writable=True) as attachment:
            if index == 0:
                make_filesystem(
                    backend.executor, attachment.device, reads_zeros=backend.reads_zeros
                )
            mount(backend.executor, attachment.device, mnt, writable=True)
            try:
                (mnt / f"file{index}").write_bytes(markers[index] * 100)
                if index == 1:
                    (mnt / "big").write_bytes(os.urandom(BIG))
            finally:
                unmount_if_mounted(backend.executor, mnt)
        backend.commit(f"l{index}")
    yield Chain(under_test, keys, markers)
    assert under_test.leftovers() == []


def _files(chain: Chain, upto: int, tmp_path: Path) -> set[str]:
    target = tmp_path / "view"
    target.mkdir(exist_ok=True)
    with chain.backend.attach(chain.links(upto), writable=False) as attachment:
        mount(chain.backend.executor, attachment.device, target, writable=False)
        try:
            return {p.name for p in target.iterdir()} - {"lost+found"}
        finally:
            unmount_if_mounted(chain.backend.executor, target)


def test_a_view_of_tier_k_shows_layers_0_to_k(chain: Chain, tmp_path: Path) -> None:
    assert _files(chain, 0, tmp_path) == {"file0"}
    assert _files(chain, 1, tmp_path) == {"file0", "file1", "big"}
    assert _files(chain, 2, tmp_path) == {"file0", "file1", "big", "file2"}


def test_each_layer_holds_only_the_clusters_it_changed(chain: Chain) -> None:
    sizes = {info.layer: info.disk_bytes for info in chain.backend.layers()}
    assert sizes["l1"] > BIG, "layer 1 holds its 6 MiB"
    assert sizes["l2"] < BIG // 2, "layer 2 does not repeat layer 1's data"
    parents = {info.layer: info.parent for info in chain.backend.layers()}
    assert parents == {"l0": None, "l1": "l0", "l2": "l1"}
    assert all(info.committed for info in chain.backend.layers())


def test_the_raw_layer_files_hold_no_plaintext(chain: Chain) -> None:
    forms = []
    for marker in chain.markers:
        forms += [
            marker,
            gzip.compress(marker * 100)[10:40],
            zstandard.compress(marker * 100)[6:36],
        ]
    for key in chain.keys:
        forms += [key, key.hex().encode()]
        if chain.kind == "dm":
            forms += [_xts_key(key), _xts_key(key).hex().encode()]
    files = chain.under_test.raw_files()
    assert files
    written = 0
    for path in files:
        if chain.kind == "qcow2":
            assert path.read_bytes().startswith(b"QFI\xfb")
        for start, data in data_extents(path):
            written += len(data)
            for form in forms:
                assert form not in data, f"{path} holds {form!r} near {start}"
    assert written > BIG, "the layers' data is there to be read (encrypted)"


def test_a_key_of_another_chain_opens_nothing(chain: Chain) -> None:
    other = new_chain(3)
    for upto in (0, 2):
        with pytest.raises(DecryptionKeyError) as caught:
            chain.backend.attach(chain.links(upto, other), writable=False)
        expected = {
            "qcow2": "Invalid password, cannot unlock any keyslot",
            "dm": "the key given for layer l0 does not open it",
        }
        assert expected[chain.kind] in str(caught.value)
        assert "\n" not in str(caught.value)


def test_the_key_of_a_lower_layer_does_not_open_the_layer_above(chain: Chain) -> None:
    """Whoever holds key 1 can derive 0..1; using key 1 (or 0) for layer 2 fails."""
    for wrong in (chain.keys[1], chain.keys[0]):
        keys = [chain.keys[0], chain.keys[1], wrong]
        with pytest.raises(DecryptionKeyError):
            chain.backend.attach(chain.links(2, keys), writable=False)


def test_a_chain_must_be_built_on_the_layers_it_names(chain: Chain) -> None:
    skipping = [ChainLink("l0", chain.keys[0]), ChainLink("l2", chain.keys[2])]
    with pytest.raises(UsageError, match=r"l2 is built on l1(\.qcow2)?, not on l0(\.qcow2)?$"):
        chain.backend.attach(skipping, writable=False)
    with pytest.raises(NotFoundError, match="l2 is not prepared"):
        chain.backend.attach(chain.links(2), writable=True)


def test_an_uncommitted_layer_is_no_lower_layer(backend: Backend) -> None:
    layers = backend.backend
    keys = new_chain(2)
    layers.create("a", None, keys[0], SIZE)
    layers.create("b", "a", keys[1], SIZE)  # built on "a" before "a" is even committed
    info = layers.info("b")
    assert info is not None
    assert (info.parent, info.committed) == ("a", False)
    if backend.kind == "qcow2":
        assert backing_file(layers.raw_paths("b")[0]) == "a.qcow2"
    with pytest.raises(NotFoundError, match="layer a is not committed"):
        layers.attach([ChainLink("a", keys[0]), ChainLink("b", keys[1])], writable=True)
    layers.remove("b")
    layers.remove("a")
    assert layers.layers() == []


def test_scratch_volumes_are_encrypted_and_vanish_when_closed(backend: Backend) -> None:
    marker = b"scratch-marker-" + os.urandom(8).hex().encode()
    with backend.backend.scratch(64 << 20) as scratch:
        with Path(scratch.device).open("r+b") as device:
            device.seek(1 << 20)
            device.write(marker * 64)
            device.flush()
            os.fsync(device.fileno())
        if backend.kind == "qcow2":
            raws = [scratch.lease.path / "scratch.luks"]
            assert raws[0].read_bytes().startswith(b"LUKS\xba\xbe")
        else:
            raws = backend.raw_files()
        written = 0
        for raw in raws:
            for _, data in data_extents(raw):
                written += len(data)
                assert marker not in data
        assert written > 64 * len(marker)
        lease = scratch.lease.path
    assert not lease.exists()
    assert backend.leftovers() == []


def test_recovery_undoes_what_a_killed_owner_held(chain: Chain, tmp_path: Path) -> None:
    """The owner (another process) is killed with SIGKILL while a chain is open
    and mounted: its devices, loop device and mount stay until `recover()`."""
    target = tmp_path / "held"
    target.mkdir()
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {os.fspath(Path(__file__).parent)!r})
        from backend_kinds import backend_from_spec
        from trustplane.layerstore.backend import ChainLink
        from trustplane.layerstore.filesystem import mount
        keys = [bytes.fromhex(k) for k in sys.argv[1:]]
        backend = backend_from_spec({chain.under_test.spec_json()!r})
        links = [ChainLink(f"l{{i}}", key) for i, key in enumerate(keys)]
        attachment = backend.attach(links, writable=False)
        mount(backend.executor, attachment.device, Path({os.fspath(target)!r}), writable=False)
        print("held", flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, *(k.hex() for k in chain.keys)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "held"
        assert (target / "file2").exists()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        held = chain.under_test.leftovers() + leftovers(os.fspath(tmp_path) + "/")
        assert any(h.startswith("daemon") for h in held), held
        assert any(h.startswith("loop") for h in held), held
        assert any(h.startswith("mount") for h in held), held
        if chain.kind == "dm":
            assert any(h.startswith("dm device") for h in held), held
        done = chain.backend.recover()
        assert len(done) == 1, done
        assert "stopped qemu-storage-daemon" in done[0], done
        if chain.kind == "dm":
            assert re.search(r"removed tp-[0-9a-f]+-[0-9a-f]+-2\b", done[0]), done
        deadline = time.monotonic() + 10
        while chain.under_test.leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert chain.under_test.leftovers() == []
        assert leftovers(os.fspath(tmp_path) + "/") == []
        assert list((chain.backend.root / "run").iterdir()) == []
        assert _files(chain, 2, tmp_path) == {"file0", "file1", "big", "file2"}
    finally:
        if owner.poll() is None:
            owner.kill()
