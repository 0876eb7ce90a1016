"""The qcow2 + LUKS chain backend against the real qemu-img, qemu-storage-daemon,
losetup and mount.

The attacker reads the raw layer files (the disk), holds keys of other
chains or of lower layers, or kills the process that holds a chain open.
"""

from __future__ import annotations

import gzip
import os
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
from store_checks import leftovers

from trustplane.crypto.key_chain import new_chain
from trustplane.errors import DecryptionKeyError, NotFoundError, UsageError
from trustplane.layerstore.backend import ChainLink
from trustplane.layerstore.filesystem import make_filesystem, mount, unmount_if_mounted
from trustplane.layerstore.qcow2 import Qcow2Backend, backing_file
from trustplane.tools import Executor

SIZE = 1 << 30
BIG = 6 << 20


@dataclass(frozen=True)
class Chain:
    backend: Qcow2Backend
    keys: list[bytes]
    markers: list[bytes]

    def links(self, upto: int, keys: list[bytes] | None = None) -> list[ChainLink]:
        keys = keys or self.keys
        return [ChainLink(f"l{i}", keys[i]) for i in range(upto + 1)]


def _marker(index: int) -> bytes:
    return f"layer-{index}-marker-{os.urandom(6).hex()}".encode()


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """Three committed layers; layer k adds file k (layer 1 also 6 MiB of data)."""
    root = tmp_path_factory.mktemp("chain")
    backend = Qcow2Backend(root / "qcow2", Executor(timeout=120))
    keys = new_chain(3)
    markers = [_marker(i) for i in range(3)]
    mnt = root / "mnt"
    mnt.mkdir()
    for index in range(3):
        backend.create(f"l{index}", f"l{index - 1}" if index else None, keys[index], SIZE)
        links = [ChainLink(f"l{i}", keys[i]) for i in range(index + 1)]
        with backend.attach(links, writable=True) as attachment:
            if index == 0:
                make_filesystem(backend.executor, attachment.device, reads_zeros=True)
            mount(backend.executor, attachment.device, mnt, writable=True)
            try:
                (mnt / f"file{index}").write_bytes(markers[index] * 100)
                if index == 1:
                    (mnt / "big").write_bytes(os.urandom(BIG))
            finally:
                unmount_if_mounted(backend.executor, mnt)
        backend.commit(f"l{index}")
    yield Chain(backend, keys, markers)
    assert leftovers(os.fspath(root) + "/") == []


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
    for info in chain.backend.layers():
        (path,) = chain.backend.raw_paths(info.layer)
        raw = path.read_bytes()
        assert raw.startswith(b"QFI\xfb")
        for form in forms:
            assert form not in raw, f"{info.layer} holds {form!r}"
        for key in chain.keys:
            assert key not in raw
            assert key.hex().encode() not in raw


def test_a_key_of_another_chain_opens_nothing(chain: Chain) -> None:
    other = new_chain(3)
    for upto in (0, 2):
        with pytest.raises(DecryptionKeyError) as caught:
            chain.backend.attach(chain.links(upto, other), writable=False)
        assert "Invalid password, cannot unlock any keyslot" in str(caught.value)
        assert "\n" not in str(caught.value)


def test_the_key_of_a_lower_layer_does_not_open_the_layer_above(chain: Chain) -> None:
    """Whoever holds key 1 can derive 0..1; using key 1 (or 0) for layer 2 fails."""
    for wrong in (chain.keys[1], chain.keys[0]):
        keys = [chain.keys[0], chain.keys[1], wrong]
        with pytest.raises(DecryptionKeyError):
            chain.backend.attach(chain.links(2, keys), writable=False)


def test_a_chain_must_be_built_on_the_layers_it_names(chain: Chain) -> None:
    skipping = [ChainLink("l0", chain.keys[0]), ChainLink("l2", chain.keys[2])]
    with pytest.raises(UsageError, match=r"l2 is built on l1\.qcow2, not on l0\.qcow2"):
        chain.backend.attach(skipping, writable=False)
    with pytest.raises(NotFoundError, match="l2 is not prepared"):
        chain.backend.attach(chain.links(2), writable=True)


def test_an_uncommitted_layer_is_no_lower_layer(tmp_path: Path, executor: Executor) -> None:
    backend = Qcow2Backend(tmp_path / "q", executor)
    keys = new_chain(2)
    backend.create("a", None, keys[0], SIZE)
    backend.create("b", "a", keys[1], SIZE)  # built on "a" before "a" is even committed
    assert backing_file(backend.raw_paths("b")[0]) == "a.qcow2"
    with pytest.raises(NotFoundError, match="layer a is not committed"):
        backend.attach([ChainLink("a", keys[0]), ChainLink("b", keys[1])], writable=True)
    backend.remove("b")
    backend.remove("a")
    assert backend.layers() == []


def test_scratch_volumes_are_encrypted_and_vanish_when_closed(
    backend: Qcow2Backend, tmp_path: Path
) -> None:
    marker = b"scratch-marker-" + os.urandom(8).hex().encode()
    with backend.scratch(64 << 20) as scratch:
        with Path(scratch.device).open("r+b") as device:
            device.seek(1 << 20)
            device.write(marker * 64)
            device.flush()
            os.fsync(device.fileno())
        raw = (scratch.lease.path / "scratch.luks").read_bytes()
        assert raw.startswith(b"LUKS\xba\xbe")
        assert marker not in raw
        lease = scratch.lease.path
    assert not lease.exists()


def test_recovery_undoes_what_a_killed_owner_held(chain: Chain, tmp_path: Path) -> None:
    """The owner (another process) is killed with SIGKILL while a chain is open
    and mounted: its daemon, loop device and mount stay until `recover()`."""
    target = tmp_path / "held"
    target.mkdir()
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from trustplane.layerstore.backend import ChainLink
        from trustplane.layerstore.filesystem import mount
        from trustplane.layerstore.qcow2 import Qcow2Backend
        keys = [bytes.fromhex(k) for k in sys.argv[1:]]
        backend = Qcow2Backend(Path({os.fspath(chain.backend.root)!r}))
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
        prefix = os.fspath(chain.backend.root) + "/"
        held = leftovers(prefix) + [m for m in leftovers(os.fspath(tmp_path) + "/")]
        assert any(h.startswith("daemon") for h in held), held
        assert any(h.startswith("loop") for h in held), held
        assert any(h.startswith("mount") for h in held), held
        done = chain.backend.recover()
        assert len(done) == 1, done
        assert "stopped qemu-storage-daemon" in done[0], done
        deadline = time.monotonic() + 10
        while leftovers(prefix) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leftovers(prefix) == []
        assert leftovers(os.fspath(tmp_path) + "/") == []
        assert list((chain.backend.root / "run").iterdir()) == []
        assert _files(chain, 2, tmp_path) == {"file0", "file1", "big", "file2"}
    finally:
        if owner.poll() is None:
            owner.kill()
