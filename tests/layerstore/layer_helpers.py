"""Building layer tars, OCI layouts and key chains for the layer-store tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from trustplane.crypto.key_chain import chain_below, new_chain
from trustplane.layerstore.keys import ChainRef
from trustplane.oci import mediatypes
from trustplane.oci.layout import LayoutWriter

MTIME = 1_600_000_000


@dataclass
class Entry:
    """One tar entry; `kind` is a tarfile type constant."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    mtime: int = MTIME
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def d(name: str, mode: int = 0o755, **kw: object) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def f(name: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> Entry:
    return Entry(name, tarfile.REGTYPE, data=data, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> Entry:
    return Entry(name, tarfile.SYMTYPE, link=target, mode=0o777)


def hard(name: str, target: str) -> Entry:
    return Entry(name, tarfile.LNKTYPE, link=target)


def whiteout(path: str) -> Entry:
    parent, _, base = path.rpartition("/")
    return f(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(directory: str) -> Entry:
    return f(f"{directory}/.wh..wh..opq")


def tar_bytes(entries: Sequence[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.kind
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.mtime = entry.mtime
            info.linkname = entry.link
            info.devmajor, info.devminor = entry.devmajor, entry.devminor
            if entry.xattrs:
                info.pax_headers = {
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                    for k, v in entry.xattrs.items()
                }
            if entry.kind == tarfile.REGTYPE:
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


COMPRESSIONS = {
    "gzip": (mediatypes.OCI_LAYER_GZIP, lambda raw: gzip.compress(raw, mtime=0)),
    "zstd": (mediatypes.OCI_LAYER_ZSTD, lambda raw: zstandard.ZstdCompressor().compress(raw)),
    "none": (mediatypes.OCI_LAYER, lambda raw: raw),
}


@dataclass(frozen=True)
class BuiltImage:
    layout: Path
    tag: str
    tars: list[bytes]
    blobs: list[bytes]
    config: dict[str, object]


def write_layout(
    path: Path,
    tars: Sequence[bytes],
    compressions: Sequence[str] | None = None,
    *,
    tag: str = "v1",
    cmd: Sequence[str] = ("/bin/sh",),
    diff_ids: Sequence[str] | None = None,
) -> BuiltImage:
    """An OCI layout holding one image made of `tars` (compressed as asked)."""
    compressions = compressions or ["gzip"] * len(tars)
    writer = LayoutWriter(path)
    descriptors, blobs = [], []
    for raw, kind in zip(tars, compressions, strict=True):
        media_type, compress = COMPRESSIONS[kind]
        blob = compress(raw)
        blobs.append(blob)
        descriptors.append(
            {"mediaType": media_type, "digest": writer.stage_bytes(blob), "size": len(blob)}
        )
    config: dict[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {
            "type": "layers",
            "diff_ids": list(diff_ids or ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]),
        },
    }
    raw_config = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": {
            "mediaType": mediatypes.OCI_CONFIG,
            "digest": writer.stage_bytes(raw_config),
            "size": len(raw_config),
        },
        "layers": descriptors,
    }
    writer.commit(json.dumps(manifest).encode(), mediatypes.OCI_MANIFEST, tag)
    writer.close(True)
    return BuiltImage(path, tag, list(tars), blobs, config)


class LocalChains:
    """`ChainKeys` without a control plane, for tests of the store's mechanics.

    (The control plane's broker is tested against the real server in
    tests/integration/test_layerstore_*.py.) Records the order of calls so a
    test can see keys destroyed before files.
    """

    def __init__(self) -> None:
        self.chains: dict[str, list[bytes]] = {}
        self.calls: list[str] = []

    def create_chain(self, repository: str, manifest_digest: str, layers: int) -> ChainRef:
        chain_id = os.urandom(8).hex()
        self.chains[chain_id] = new_chain(layers)
        self.calls.append(f"create {chain_id}")
        return ChainRef("local", chain_id)

    def layer_keys(self, chain: ChainRef, tier: int) -> list[bytes]:
        self.calls.append(f"key {chain.id} {tier}")
        return chain_below(self.chains[chain.id][tier], tier)

    def destroy_chain(self, chain: ChainRef) -> None:
        self.calls.append(f"destroy {chain.id}")
        self.chains.pop(chain.id, None)
