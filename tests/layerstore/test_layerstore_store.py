"""The store: import, views by tier, containers, removal, and crashes, with the real tools.

Keys come from `LocalChains` here (the control plane's broker is exercised in
tests/integration/test_layerstore_*.py); everything else is real: qemu-img,
qemu-storage-daemon, losetup, mount, mkfs.ext4, overlayfs, runc, and for
the device-mapper backend dmsetup in the QEMU test guest. Every test runs
on both backends (backend_kinds.py).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from backend_kinds import KINDS, Backend, backend_of, data_extents
from layer_helpers import (
    BuiltImage,
    LocalChains,
    d,
    f,
    tar_bytes,
    whiteout,
    write_layout,
)
from store_checks import leftovers

from trustplane.crypto import keywrap
from trustplane.crypto.keys import (
    UnwrapKey,
    generate_key_pair,
    load_recipient_key,
    load_unwrap_key,
)
from trustplane.crypto.layer_cipher import Keystream, PrivateOptions, PublicOptions, new_mac
from trustplane.embedded.sample_images import busybox_rootfs_tar
from trustplane.errors import DecryptionKeyError, IntegrityError, UsageError
from trustplane.images.encrypt import EncryptRequest, encrypt_image
from trustplane.images.recipients import parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.layerstore import ImportRequest, LayerStore, StoredImage
from trustplane.layerstore.keys import ChainRef
from trustplane.layerstore.leases import Lease
from trustplane.oci.annotations import ENC_KEYS_JWE, ENC_PUBOPTS
from trustplane.oci.reference import LayoutRef

SIZE = 1 << 30


def _markers() -> list[bytes]:
    return [f"marker-of-layer-{i}-{os.urandom(8).hex()}".encode() for i in range(3)]


def _image(path: Path, markers: list[bytes]) -> BuiltImage:
    """0: busybox (gzip), 1: /app (zstd), 2: /secrets/token, /app/old removed (plain)."""
    base = busybox_rootfs_tar()
    app = tar_bytes(
        [
            d("app"),
            f("app/run.sh", b"#!/bin/sh\necho app says " + markers[1] + b"\n", mode=0o755),
            f("app/old", b"to be removed"),
            f("etc/marker0", markers[0]),
        ]
    )
    secret = tar_bytes([d("secrets", 0o700), f("secrets/token", markers[2]), whiteout("app/old")])
    return write_layout(path, [base, app, secret], ["gzip", "zstd", "none"])


def _request(image: BuiltImage, **kw: object) -> ImportRequest:
    return ImportRequest(
        source=LayoutRef(image.layout, image.tag),
        repository="registry.example/shop/app",
        size=SIZE,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(backend: Backend) -> LayerStore:
    return LayerStore(backend.store_root, backend=backend.backend)


@dataclass(frozen=True)
class Imported:
    store: LayerStore
    image: BuiltImage
    stored: StoredImage
    keys: LocalChains
    markers: list[bytes]
    under_test: Backend


@pytest.fixture(scope="module", params=KINDS)
def imported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Imported]:
    """One image imported once for the tests that only read it."""
    root = tmp_path_factory.mktemp("imported")
    markers = _markers()
    image = _image(root / "layout", markers)
    with backend_of(request.param, root / "store", request) as under_test:
        store = LayerStore(under_test.store_root, backend=under_test.backend)
        keys = LocalChains()
        stored = store.import_image(_request(image, tiers={"contractor": 1}), keys)
        yield Imported(store, image, stored, keys, markers, under_test)
        assert under_test.leftovers() == []
    assert leftovers(os.fspath(root) + "/") == []


def _layers(store: LayerStore) -> list[str]:
    return sorted(info.layer for info in store.backend.layers())


def test_import_then_views_by_tier_then_a_container(imported: Imported) -> None:
    store, stored, keys, markers = imported.store, imported.stored, imported.keys, imported.markers
    assert stored.name == "registry.example/shop/app:v1"
    assert [layer.encrypted_in_source for layer in stored.layers] == [False] * 3
    assert store.images() == [stored]
    assert list(store.lease_dir.iterdir()) == []
    calls = len(keys.calls)

    with store.view(stored, "contractor", keys) as view:
        assert view.tier == 1
        assert (view.root / "app/run.sh").exists()
        assert (view.root / "app/old").exists()
        assert not (view.root / "secrets").exists()
        with pytest.raises(OSError, match="Read-only file system"):
            (view.root / "new").write_bytes(b"x")
    assert keys.calls[calls].endswith(" 1"), "a tier-1 view asks for layer 1's key only"
    with store.view(stored, None, keys) as view:
        assert (view.root / "secrets/token").read_bytes() == markers[2]
        assert not (view.root / "app/old").exists(), "the whiteout of layer 2 applied"
        assert not (view.root / "lost+found").exists()

    result = store.run(
        stored, 2, ["/bin/sh", "-c", "cat /secrets/token; /app/run.sh; echo x > /new; exit 7"], keys
    )
    assert result.exit_code == 7, result.stderr
    assert result.stdout == markers[2] + b"app says " + markers[1] + b"\n"
    result = store.run(stored, 1, ["/bin/sh", "-c", "ls /new /secrets"], keys)
    assert result.exit_code != 0, "neither the last run's writes nor layer 2 are there"
    assert b"/new" in result.stderr


def test_the_raw_files_hold_no_plaintext_of_any_layer_in_any_form(imported: Imported) -> None:
    store, image, keys, markers = imported.store, imported.image, imported.keys, imported.markers
    store.run(imported.stored, 2, ["/bin/sh", "-c", "cat /secrets/token > /copy"], keys)
    forms = []
    for marker in markers:
        forms += [
            marker,
            gzip.compress(marker, mtime=0)[10:-8],
            zstandard.ZstdCompressor().compress(marker)[6:],
        ]
    # Stretches of the blobs as they came (gzip, zstd, plain tar) and of the
    # tars inside them: a store that kept a blob, a compressed or a plain copy
    # would show them (zero runs are in any file: only varied stretches count).
    for blob in [*image.blobs, *image.tars]:
        stride = max(48, len(blob) // 400)
        windows = [blob[i : i + 48] for i in range(0, len(blob) - 48, stride)]
        forms += [w for w in windows if len(set(w)) >= 16]
    assert len(forms) > 400
    assert len(_layers(store)) == 3
    raws = imported.under_test.raw_files()
    assert raws
    for path in raws:
        for start, raw in data_extents(path):
            for form in forms:
                assert form not in raw, f"{path} holds {form[:20]!r} near {start}"
    # The record holds names, digests and the config (public in the source), no key.
    record = (store.root / "images" / f"{imported.stored.id}.json").read_bytes()
    for marker in markers:
        assert marker not in record
    for chain in keys.chains.values():
        for key in chain:
            assert key.hex().encode() not in record


_RUNNER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {helpers!r})
    from backend_kinds import backend_from_spec
    from layer_helpers import LocalChains
    from trustplane.layerstore import LayerStore
    from trustplane.layerstore.keys import ChainRef
    store = LayerStore(Path({root!r}), backend=backend_from_spec({spec!r}))
    keys = LocalChains()
    keys.chains[{chain!r}] = [bytes.fromhex(k) for k in {chain_keys!r}]
    image = store.find({name!r})
    store.run(image, 2, ["/bin/sh", "-c", "echo started > /dev/stderr; exec sleep 6{tag}"], keys)
    """
)


def test_a_container_whose_runner_was_killed_is_stopped_by_the_next_start(
    imported: Imported,
) -> None:
    store, stored = imported.store, imported.stored
    tag = str(int.from_bytes(os.urandom(3), "big"))
    script = _RUNNER.format(
        helpers=os.fspath(Path(__file__).parent),
        root=os.fspath(store.root),
        spec=imported.under_test.spec_json(),
        chain=stored.chain_id,
        chain_keys=[k.hex() for k in imported.keys.chains[stored.chain_id]],
        name=stored.name,
        tag=tag,
    )
    runner = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not _processes(f"sleep 6{tag}"):
            assert runner.poll() is None
            assert time.monotonic() < deadline, "the container never started"
            time.sleep(0.1)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
    finally:
        if runner.poll() is None:
            runner.kill()
    assert _processes(f"sleep 6{tag}"), "the container outlives its runner"
    assert imported.under_test.leftovers()
    again = LayerStore(store.root, backend=imported.under_test.reopen())
    assert any("container trustplane-" in line for line in again.recovered), again.recovered
    deadline = time.monotonic() + 10
    while _processes(f"sleep 6{tag}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes(f"sleep 6{tag}")
    assert imported.under_test.leftovers() == []
    assert again.images() == [stored]


def _processes(argv_text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            except OSError:
                continue
            if cmdline == argv_text.encode():
                found.append(int(entry.name))
    return found


def test_a_layer_that_does_not_match_its_diff_id_leaves_nothing(
    store: LayerStore, tmp_path: Path
) -> None:
    markers = _markers()
    good = _image(tmp_path / "good", markers)
    bad_diff_ids = list(good.config["rootfs"]["diff_ids"])  # type: ignore[index]
    bad_diff_ids[1] = "sha256:" + "0" * 64
    image = write_layout(
        tmp_path / "bad", good.tars, ["gzip", "zstd", "none"], diff_ids=bad_diff_ids
    )
    keys = LocalChains()
    with pytest.raises(IntegrityError, match="layer 1: content does not match the config"):
        store.import_image(_request(image), keys)
    assert store.images() == []
    assert _layers(store) == []
    assert list(store.lease_dir.iterdir()) == []
    assert keys.chains == {}, "the chain made for the import is destroyed"


def test_a_blob_altered_in_the_source_is_refused(store: LayerStore, tmp_path: Path) -> None:
    image = _image(tmp_path / "layout", _markers())
    blob = image.layout / "blobs" / "sha256"
    target = max(blob.iterdir(), key=lambda p: p.stat().st_size)  # the busybox layer
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    keys = LocalChains()
    with pytest.raises(IntegrityError, match="layer 0"):
        store.import_image(_request(image), keys)
    assert store.images() == []
    assert _layers(store) == []


def test_remove_destroys_the_keys_before_the_files(store: LayerStore, tmp_path: Path) -> None:
    image = _image(tmp_path / "layout", _markers())
    seen: list[int] = []

    class Watching(LocalChains):
        def destroy_chain(self, chain: ChainRef) -> None:
            seen.append(len(_layers(store)))
            super().destroy_chain(chain)

    keys = Watching()
    stored = store.import_image(_request(image), keys)
    store.remove(stored, keys)
    assert seen == [3], "the keys went while the layers were all still there"
    assert _layers(store) == []
    assert store.images() == []


def test_tiers_and_names_are_checked(store: LayerStore, tmp_path: Path) -> None:
    image = _image(tmp_path / "layout", _markers())
    keys = LocalChains()
    with pytest.raises(UsageError, match="tier boss=3"):
        store.import_image(_request(image, tiers={"boss": 3}), keys)
    with pytest.raises(UsageError, match="give --repository"):
        store.import_image(ImportRequest(source=LayoutRef(image.layout, image.tag)), keys)
    stored = store.import_image(_request(image), keys)
    with pytest.raises(UsageError, match="no tier 'nobody'"):
        stored.tier("nobody")
    with pytest.raises(UsageError, match="tier 5 does not exist"):
        stored.tier(5)


_IMPORTER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {helpers!r})
    from backend_kinds import backend_from_spec
    from layer_helpers import LocalChains
    from trustplane.layerstore import ImportRequest, LayerStore, StoredImage
    from trustplane.oci.reference import LayoutRef
    store = LayerStore(Path({root!r}), backend=backend_from_spec({spec!r}))
    request = ImportRequest(
        source=LayoutRef(Path({layout!r}), "v1"), repository="registry.example/big", size=1 << 30
    )
    store.import_image(request, LocalChains())
    """
)


def test_kill_9_during_an_import_leaves_no_layer_and_a_restart_cleans_up(
    backend: Backend, tmp_path: Path
) -> None:
    """The importer is SIGKILLed while it fills layer 1 (a layer is committed
    already, another is half written, its devices, a loop device and a mount
    are live). Opening the store again leaves no layer, half or whole, that a
    later view could use, nothing attached, and the chain to be destroyed."""
    big = tar_bytes([f("data", os.urandom(48 << 20))])
    image = write_layout(
        tmp_path / "layout",
        [tar_bytes([f("base", b"base")]), big, tar_bytes([f("top", b"top")])],
        ["gzip", "none", "none"],
    )
    root = backend.store_root
    script = _IMPORTER.format(
        helpers=os.fspath(Path(__file__).parent),
        root=os.fspath(root),
        spec=backend.spec_json(),
        layout=os.fspath(image.layout),
    )
    importer = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not _filling(root, 8 << 20):
            assert importer.poll() is None, importer.stderr.read() if importer.stderr else ""
            assert time.monotonic() < deadline, "layer 1 never started filling"
            time.sleep(0.05)
        os.kill(importer.pid, signal.SIGKILL)
        importer.wait()
    finally:
        if importer.poll() is None:
            importer.kill()
    assert backend.leftovers(), "the killed importer left its devices, loop device and mount"
    assert any(not info.committed for info in backend.backend.layers()), "a half layer"

    store = LayerStore(root, backend=backend.reopen())  # a restart: recovery runs first
    assert backend.leftovers() == []
    assert store.images() == []
    assert _layers(store) == []
    (pending,) = list(store.lease_dir.iterdir())  # waits for the chain's destruction
    assert any("awaits a recovery" in line for line in store.recovered), store.recovered

    keys = LocalChains()
    done = store.recover(keys)
    assert any("destroyed" in line for line in done), done
    assert [c.split()[0] for c in keys.calls] == ["destroy"]
    assert not pending.exists()


def _filling(root: Path, size: int) -> bool:
    """Layer 1's big file is being written into the mounted layer (either backend)."""
    for data in root.glob("*/run/*/fill/data"):
        with contextlib.suppress(OSError):
            if data.stat().st_size > size:
                return True
    return False


@dataclass(frozen=True)
class Encrypted:
    plain: BuiltImage
    ref: LayoutRef
    keys: dict[str, UnwrapKey]
    public: dict[str, Path]
    markers: list[bytes]


def _encrypted(tmp_path: Path) -> Encrypted:
    """The test image with layers 1 and 2 encrypted (`image encrypt`) for a full
    and a tier-1 recipient."""
    markers = _markers()
    plain = _image(tmp_path / "plain", markers)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    keys, public = {}, {}
    for who in ("full", "tier1"):
        private, public_pem = generate_key_pair("ec-p256")
        (keys_dir / f"{who}.pem").write_bytes(private)
        public[who] = keys_dir / f"{who}.pub"
        public[who].write_bytes(public_pem)
        keys[who] = load_unwrap_key(private, who)
    encrypted = LayoutRef(tmp_path / "encrypted", "v1")
    encrypt_image(
        EncryptRequest(
            source=LayoutRef(plain.layout, plain.tag),
            destination=encrypted,
            recipients=[
                parse_recipient(f"jwe:{public['full']}"),
                parse_recipient(f"jwe:{public['tier1']}:tier=1"),
            ],
            selector=LayerSelector.parse(["1,2"]),
        )
    )
    return Encrypted(plain, encrypted, keys, public, markers)


def test_an_encrypted_image_is_stored_as_far_as_the_callers_keys_reach(
    store: LayerStore, backend: Backend, tmp_path: Path
) -> None:
    """ocicrypt layers (encrypted by `image encrypt` for a full and a tier-1
    recipient) go straight into the store: the full key stores all three
    layers, the tier-1 key layers 0..1, and no key nothing at all."""
    image = _encrypted(tmp_path)
    chains = LocalChains()
    full = store.import_image(
        ImportRequest(source=image.ref, repository="r.example/enc", name="full", size=SIZE,
                      keys=[image.keys["full"]]),
        chains,
    )  # fmt: skip
    assert [x.encrypted_in_source for x in full.layers] == [False, True, True]
    assert [x.diff_id for x in full.layers] == image.plain.config["rootfs"]["diff_ids"]  # type: ignore[index]
    with store.view(full, None, chains) as view:
        assert (view.root / "secrets/token").read_bytes() == image.markers[2]
    cut = store.import_image(
        ImportRequest(source=image.ref, repository="r.example/enc", name="cut", size=SIZE,
                      keys=[image.keys["tier1"]]),
        chains,
    )  # fmt: skip
    assert (len(cut.layers), cut.source_layers) == (2, 3)
    with pytest.raises(DecryptionKeyError, match="none of the given keys can open layer 1"):
        store.import_image(
            ImportRequest(source=image.ref, repository="r.example/enc", size=SIZE), chains
        )
    raws = backend.raw_files()
    assert raws
    for path in raws:
        for start, raw in data_extents(path):
            for marker in image.markers:
                assert marker not in raw, f"{path} holds a marker near {start}"


def _flip_inside_the_token(image: Encrypted, layer: dict[str, Any]) -> bytes:
    """AES-CTR is malleable: flipping ciphertext bits flips the same plaintext
    bits. Layer 2 is an uncompressed tar, so the attacker changes the token
    to a value of its choice and the tar stays valid."""
    blob = image.ref.path / "blobs" / "sha256" / layer["digest"].partition(":")[2]
    data = bytearray(blob.read_bytes())
    tar = image.plain.tars[2]
    assert len(data) == len(tar), "an uncompressed layer's ciphertext is as long as its tar"
    at = tar.index(image.markers[2])
    wanted = b"attacker" + image.markers[2][8:]
    for i, (old, new) in enumerate(zip(image.markers[2], wanted, strict=True)):
        data[at + i] ^= old ^ new
    altered_tar = tar[:at] + wanted + tar[at + len(wanted) :]
    layer["digest"], layer["size"] = _store_blob(image.ref.path, bytes(data)), len(data)
    return altered_tar


def _forged_layer(image: Encrypted, layer: dict[str, Any]) -> bytes:
    """A layer encrypted afresh by someone holding only the public key: its own
    content, a valid HMAC, and private options that claim the original digest."""
    tar = tar_bytes([d("secrets", 0o700), f("secrets/token", b"attacker's token")])
    symkey, nonce = os.urandom(32), os.urandom(16)
    ciphertext = Keystream(symkey, nonce).update(tar)
    mac = new_mac(symkey)
    mac.update(ciphertext)
    claimed = PrivateOptions(
        symkey, nonce, "sha256:" + hashlib.sha256(image.plain.blobs[2]).hexdigest()
    )
    recipient = load_recipient_key(image.public["full"].read_bytes(), "full.pub")
    layer["digest"], layer["size"] = _store_blob(image.ref.path, ciphertext), len(ciphertext)
    layer["annotations"] = {
        ENC_KEYS_JWE: base64.b64encode(
            keywrap.wrap(claimed.to_json(), [recipient]).encode()
        ).decode(),
        ENC_PUBOPTS: base64.b64encode(PublicOptions(hmac=mac.digest()).to_json()).decode(),
    }
    return tar


def _store_blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest.partition(":")[2]).write_bytes(data)
    return digest


def _rewrite(image: Encrypted, alter: Callable[[Encrypted, dict[str, Any]], bytes]) -> None:
    """Alter layer 2 as an attacker who can write the image source but holds no
    key would, and make the manifest and the config's diff_id agree with it:
    only the layer's own authentication (HMAC, plain digest) is left to notice."""
    root = image.ref.path
    index = json.loads((root / "index.json").read_bytes())
    manifest_blob = root / "blobs" / "sha256" / index["manifests"][0]["digest"].partition(":")[2]
    manifest = json.loads(manifest_blob.read_bytes())
    altered_tar = alter(image, manifest["layers"][2])
    config = json.loads(_read_blob(root, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"][2] = "sha256:" + hashlib.sha256(altered_tar).hexdigest()
    raw_config = json.dumps(config).encode()
    manifest["config"].update(digest=_store_blob(root, raw_config), size=len(raw_config))
    raw_manifest = json.dumps(manifest).encode()
    index["manifests"][0].update(digest=_store_blob(root, raw_manifest), size=len(raw_manifest))
    (root / "index.json").write_text(json.dumps(index))


def _read_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.partition(":")[2]).read_bytes()


@pytest.mark.parametrize(
    ("alter", "message"),
    [
        (_flip_inside_the_token, "layer 2: HMAC mismatch"),
        (_forged_layer, "layer 2: decrypted content does not match its digest"),
    ],
    ids=["flipped ciphertext", "forged layer"],
)
def test_an_encrypted_layer_is_released_only_once_it_authenticates(
    store: LayerStore,
    tmp_path: Path,
    alter: Callable[[Encrypted, dict[str, Any]], bytes],
    message: str,
) -> None:
    """Attacker: write access to the image source, no key. Layer 2's altered
    plaintext is a valid tar that the config's diff_id names, so it is applied
    into layer 2's snapshot (encrypted, not yet committed) before the HMAC or
    the plain digest can be checked at the end of the stream. The check fails,
    so nothing of the import is left: no image, no layer (not even the good
    layers 0 and 1), no lease, no key chain."""
    image = _encrypted(tmp_path)
    _rewrite(image, alter)
    keys = LocalChains()
    with pytest.raises(IntegrityError, match=message):
        store.import_image(
            ImportRequest(source=image.ref, repository="r.example/enc", size=SIZE,
                          keys=[image.keys["full"]]),
            keys,
        )  # fmt: skip
    assert [c.split()[0] for c in keys.calls] == ["create", "key", "destroy"]
    assert keys.chains == {}
    assert store.images() == []
    assert _layers(store) == []
    assert list(store.lease_dir.iterdir()) == []


def test_an_importer_that_died_after_its_record_leaves_the_image_whole(
    imported: Imported,
) -> None:
    """Killed between writing the record and dropping its lease: the image is complete."""
    store, stored = imported.store, imported.stored
    lease = Lease.take(
        store.lease_dir,
        {
            "kind": "import",
            "image": stored.id,
            "layers": [layer.layer for layer in stored.layers],
            "chain": {"server": stored.chain_server, "id": stored.chain_id},
        },
    )
    lease.abandon()  # as a SIGKILL leaves it: the lock gone, the lease still there
    again = LayerStore(store.root, backend=imported.under_test.reopen())
    assert f"import {stored.id}: complete" in again.recovered
    assert again.images() == [stored]
    assert len(_layers(again)) == 3
    assert stored.chain_id in imported.keys.chains
    with again.view(stored, None, imported.keys) as view:
        assert (view.root / "secrets/token").read_bytes() == imported.markers[2]
