"""The snapshotter's mechanics on the real qcow2 backend, without containerd: what each
call builds, what Commit and Remove refuse, what a restart finishes or undoes.

(containerd itself drives it in tests/integration/test_layerstore_containerd.py.)
Keys come from `LocalChains`: the broker is the control plane's, tested there.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from layer_helpers import LocalChains

from trustplane.errors import ConflictError, DecryptionKeyError, NotFoundError, UnavailableError
from trustplane.layerstore.keys import ChainRef
from trustplane.layerstore.snapshots import Kind, SnapshotTable, State
from trustplane.layerstore.snapshotter import Mount, Snapshotter, new_layer_id

SIZE = 256 << 20
CHAIN_A = "sha256:" + "a" * 64
CHAIN_B = "sha256:" + "b" * 64
MARK_A = b"SNAPSHOTTER-TEST-MARK-A-17c3\n"
MARK_B = b"SNAPSHOTTER-TEST-MARK-B-52e9\n"
MARK_W = b"SNAPSHOTTER-TEST-WRITTEN-90ad\n"


def extract(n: int, chain: str) -> str:
    """A key as containerd's unpacker makes it, namespaced as it reaches a plugin."""
    return f"ns/{n}/extract-{n} {chain}"


@pytest.fixture
def keys() -> LocalChains:
    return LocalChains()


@pytest.fixture
def snapshotter(tmp_path: Path, keys: LocalChains) -> Iterator[Snapshotter]:
    opened = Snapshotter(tmp_path / "snap", keys, repository="test/ctd", layer_size=SIZE)
    yield opened
    opened.close()


def mounted(mounts: list[Mount], target: Path) -> Path:
    """Mount what the snapshotter returned, as containerd does."""
    (entry,) = mounts
    target.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", entry.type, "-o", ",".join(entry.options), entry.source, str(target)],
        check=True,
    )
    return target


def umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


def raw_holds(snap: Snapshotter, needle: bytes) -> list[Path]:
    """Regular files under the root holding `needle` (never through a mount)."""
    points = {line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()}
    found = []
    for directory, dirs, files in os.walk(snap.root):
        dirs[:] = [d for d in dirs if os.fspath(Path(directory, d)) not in points]
        for name in files:
            path = Path(directory, name)
            if os.fspath(path) not in points and path.is_file() and needle in path.read_bytes():
                found.append(path)
    return found


def base_layer(snap: Snapshotter, tmp_path: Path, name: str = "ns/2/L0") -> str:
    """A committed base layer holding /a (MARK_A) and /dir/old."""
    key = extract(1, CHAIN_A)
    root = mounted(snap.prepare(key, "", {}), tmp_path / "fill")
    (root / "a").write_bytes(MARK_A)
    (root / "dir").mkdir()
    (root / "dir" / "old").write_bytes(b"old\n")
    umount(root)
    snap.commit(name, key, {"containerd.io/snapshot.ref": CHAIN_A})
    return name


def test_layers_are_encrypted_each_under_its_own_key(
    snapshotter: Snapshotter, keys: LocalChains, tmp_path: Path
) -> None:
    base = base_layer(snapshotter, tmp_path)
    key = extract(3, CHAIN_B)
    mounts = snapshotter.prepare(key, base, {})
    assert mounts[0].type == "ext4"
    assert mounts[0].options == ("rw",)
    root = mounted(mounts, tmp_path / "fill")
    assert (root / "a").read_bytes() == MARK_A  # the parent's content, from its layer
    (root / "b").write_bytes(MARK_B)
    (root / "a").unlink()
    umount(root)
    top = snapshotter.commit("ns/4/L1", key, {})
    assert (top.kind, top.parent) == (Kind.COMMITTED, base)
    with pytest.raises(NotFoundError):
        snapshotter.stat(key)  # the active's key is gone after Commit

    view = snapshotter.view("ns/5/v", "ns/4/L1", {})
    assert view[0].options == ("ro", "noload")
    root = mounted(view, tmp_path / "view")
    assert sorted(p.name for p in root.iterdir()) == ["b", "dir", "lost+found"]
    umount(root)
    layers = snapshotter.walk(["kind==committed"])
    assert len({s.key_ref for s in layers}) == 2
    assert {s.layer for s in layers} == {i.layer for i in snapshotter.backend.layers()}
    for mark in (MARK_A, MARK_B):
        assert raw_holds(snapshotter, mark) == []
    # The table names keys' chains, never a key.
    table = (snapshotter.root / "snapshots.json").read_bytes()
    assert not any(k.hex().encode() in table or k in table for c in keys.chains.values() for k in c)


def test_a_key_of_another_layer_opens_nothing(tmp_path: Path, keys: LocalChains) -> None:
    """Someone who swaps the key references in the table (or holds another layer's
    key) gets a refusal, not the layer."""
    root = tmp_path / "snap"
    snap = Snapshotter(root, keys, repository="test/ctd", layer_size=SIZE)
    try:
        base = base_layer(snap, tmp_path)
    finally:
        snap.close()
    table = json.loads((root / "snapshots.json").read_bytes())
    record = table["snapshots"][base]
    other = keys.create_chain("test/ctd", CHAIN_B, 1)
    record["key_ref"] = {"server": other.server, "id": other.id}
    (root / "snapshots.json").write_text(json.dumps(table))
    snap = Snapshotter(root, keys, repository="test/ctd", layer_size=SIZE)
    try:
        with pytest.raises(DecryptionKeyError):
            snap.view("ns/9/v", base, {})
        assert [s.key for s in snap.walk()] == [base]  # the refused view left nothing
    finally:
        snap.close()


def test_remove_refuses_a_parent_and_destroys_the_key_before_the_files(
    snapshotter: Snapshotter, keys: LocalChains, tmp_path: Path
) -> None:
    base = base_layer(snapshotter, tmp_path)
    snapshotter.view("ns/5/v", base, {})
    with pytest.raises(ConflictError, match="children"):
        snapshotter.remove(base)
    snapshotter.remove("ns/5/v")
    chain = snapshotter.stat(base).key_ref
    assert chain is not None
    snapshotter.remove(base)
    assert keys.calls[-1] == f"destroy {chain.id}"
    assert chain.id not in keys.chains
    assert snapshotter.backend.layers() == []
    assert snapshotter.walk() == []
    with pytest.raises(NotFoundError):
        snapshotter.remove(base)


def test_commit_is_refused_while_mounted_and_remove_discards(
    tmp_path: Path, keys: LocalChains
) -> None:
    snap = Snapshotter(
        tmp_path / "snap", keys, repository="test/ctd", layer_size=SIZE, discard_wait=0.5
    )
    try:
        key = extract(1, CHAIN_A)
        root = mounted(snap.prepare(key, "", {}), tmp_path / "fill")
        with pytest.raises(ConflictError, match="mounted"):
            snap.commit("ns/2/L0", key, {})
        assert snap.stat(key).state is State.READY
        umount(root)
        snap.commit("ns/2/L0", key, {})
        # Remove: containerd has dropped the snapshot; a mount that lingers (a dying
        # container's) is waited for, then detached anyway.
        root = mounted(snap.view("ns/3/v", "ns/2/L0", {}), tmp_path / "view")
        snap.remove("ns/3/v")
        assert os.fspath(root) not in Path("/proc/self/mounts").read_text()
        assert [s.key for s in snap.walk()] == ["ns/2/L0"]
    finally:
        snap.close()


def test_a_containers_writes_are_ephemeral_and_commit_as_a_layer(
    snapshotter: Snapshotter, keys: LocalChains, tmp_path: Path
) -> None:
    base = base_layer(snapshotter, tmp_path)
    mounts = snapshotter.prepare("ns/6/container", base, {})
    assert mounts[0].type == "overlay"
    root = mounted(mounts, tmp_path / "rootfs")
    assert (root / "a").read_bytes() == MARK_A
    (root / "w").write_bytes(MARK_W)
    (root / "a").unlink()  # a whiteout in the upper directory
    subprocess.run(["rm", "-rf", str(root / "dir")], check=True)
    (root / "dir").mkdir()  # an opaque directory: /dir/old must stay hidden
    (root / "dir" / "new").write_bytes(b"new\n")
    os.sync()
    assert raw_holds(snapshotter, MARK_W) == []  # the scratch volume is encrypted
    umount(root)
    before = len(snapshotter.backend.layers())
    committed = snapshotter.commit("ns/7/C", "ns/6/container", {"k": "v"})
    assert committed.layer is not None
    assert committed.key_ref is not None
    assert len(snapshotter.backend.layers()) == before + 1
    root = mounted(snapshotter.view("ns/8/v", "ns/7/C", {}), tmp_path / "view")
    try:
        assert (root / "w").read_bytes() == MARK_W
        assert not (root / "a").exists()
        assert sorted(p.name for p in (root / "dir").iterdir()) == ["new"]
    finally:
        umount(root)
    assert raw_holds(snapshotter, MARK_W) == []


def test_a_restart_finishes_or_undoes_what_a_crash_interrupted(
    tmp_path: Path, keys: LocalChains
) -> None:
    root = tmp_path / "snap"
    first = Snapshotter(root, keys, repository="test/ctd", layer_size=SIZE)
    backend = first.backend
    first.close()
    table = SnapshotTable(root / "snapshots.json")

    # Caught while being made: a CREATING record, its chain, its layer file.
    half = new_layer_id()
    table.begin_create("ns/1/half", "", Kind.ACTIVE, {}, half)
    half_chain = keys.create_chain("test/ctd", CHAIN_A, 1)
    table.set_key_ref("ns/1/half", half_chain)
    backend.create(half, None, keys.layer_keys(half_chain, 0)[0], SIZE)
    # Caught committing, after the backend committed the layer.
    done = new_layer_id()
    table.begin_create("ns/2/active", "", Kind.ACTIVE, {}, done)
    done_chain = keys.create_chain("test/ctd", CHAIN_B, 1)
    table.set_key_ref("ns/2/active", done_chain)
    table.finish_create("ns/2/active")
    backend.create(done, None, keys.layer_keys(done_chain, 0)[0], SIZE)
    table.begin_commit("ns/3/committed", "ns/2/active", {})
    backend.commit(done)
    # Caught removing: the record says so, the key and the file are still there.
    going = new_layer_id()
    table.begin_create("ns/4/going", "", Kind.ACTIVE, {}, going)
    going_chain = keys.create_chain("test/ctd", CHAIN_B, 1)
    table.set_key_ref("ns/4/going", going_chain)
    table.finish_create("ns/4/going")
    backend.create(going, None, keys.layer_keys(going_chain, 0)[0], SIZE)
    table.begin_remove("ns/4/going")
    # A layer no record claims, and a key chain whose destruction failed earlier.
    orphan = new_layer_id()
    backend.create(orphan, None, os.urandom(32), SIZE)
    queued = keys.create_chain("test/ctd", CHAIN_A, 1)
    table.queue_shred(queued)

    again = Snapshotter(root, keys, repository="test/ctd", layer_size=SIZE)
    try:
        lines = "\n".join(again.recovered)
        assert "ns/1/half: half made, undone" in lines
        assert "ns/2/active: commit to ns/3/committed finished" in lines
        assert "ns/4/going: removal finished" in lines
        assert f"layer {orphan}: removed" in lines
        assert f"key chain {queued.id}: destroyed" in lines
        assert [s.key for s in again.walk()] == ["ns/3/committed"]
        assert {i.layer for i in again.backend.layers()} == {done}
        for chain in (half_chain, going_chain, queued):
            assert chain.id not in keys.chains
        assert done_chain.id in keys.chains
        assert again.table.pending_shreds() == []
    finally:
        again.close()


class _Unreachable(LocalChains):
    """The control plane out of reach when keys are to be destroyed."""

    down = True

    def destroy_chain(self, chain: ChainRef) -> None:
        if self.down:
            raise UnavailableError("control plane unreachable")
        super().destroy_chain(chain)


def test_a_key_that_cannot_be_destroyed_now_is_destroyed_later(tmp_path: Path) -> None:
    keys = _Unreachable()
    snap = Snapshotter(tmp_path / "snap", keys, repository="test/ctd", layer_size=SIZE)
    try:
        key = extract(1, CHAIN_A)
        snap.prepare(key, "", {})
        chain = snap.stat(key).key_ref
        assert chain is not None
        snap.remove(key)  # the layer goes now; its key waits
        assert snap.walk() == []
        assert snap.backend.layers() == []
        assert snap.table.pending_shreds() == [chain.chain]
        assert "still not destroyed" in snap.cleanup()[0]
        keys.down = False
        assert snap.cleanup() == [f"key chain {chain.id}: destroyed"]
        assert chain.id not in keys.chains
    finally:
        snap.close()


def test_one_snapshotter_per_root(snapshotter: Snapshotter, keys: LocalChains) -> None:
    from trustplane.errors import UsageError

    with pytest.raises(UsageError, match="another snapshotter"):
        Snapshotter(snapshotter.root, keys, repository="test/ctd")
