"""Reading and altering OCI layouts in tests, independently of trustplane's code."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any


def index_entry(layout: Path, tag: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_bytes())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return dict(entry)
    raise AssertionError(f"{layout} has no tag {tag}")


def blob(layout: Path, digest: str) -> bytes:
    algorithm, _, hexdigest = digest.partition(":")
    return (layout / "blobs" / algorithm / hexdigest).read_bytes()


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def manifest_bytes(layout: Path, tag: str) -> bytes:
    return blob(layout, index_entry(layout, tag)["digest"])


def manifest(layout: Path, tag: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(manifest_bytes(layout, tag))
    return result


def config(layout: Path, tag: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(blob(layout, manifest(layout, tag)["config"]["digest"]))
    return result


def write_manifest(layout: Path, tag: str, data: dict[str, Any] | bytes) -> str:
    """Store a (modified) manifest and point `tag` at it, as an attacker would."""
    raw = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    blob_path(layout, digest).write_bytes(raw)
    index = json.loads((layout / "index.json").read_bytes())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            entry["digest"], entry["size"] = digest, len(raw)
    (layout / "index.json").write_text(json.dumps(index))
    return digest


def copy_layout(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def tree(path: Path) -> list[str]:
    """Every path below `path`, to show that a failed operation changed nothing."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))
