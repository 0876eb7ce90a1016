"""The OCI layout on disk: what a commit writes, and that a failure leaves nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from trustplane.errors import MalformedError, NotFoundError, UsageError
from trustplane.oci import layout as layout_module
from trustplane.oci import mediatypes
from trustplane.oci.layout import (
    LAYOUT_FILE,
    REF_NAME,
    STAGING_PREFIX,
    Layout,
    LayoutWriter,
    blob_path,
)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for directories)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def _manifest(config: str, layers: list[str]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": config, "size": 2},
        "layers": [{"mediaType": mediatypes.OCI_LAYER, "digest": d, "size": 1} for d in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _write_image(root: Path, tag: str | None, layer: bytes = b"L") -> str:
    writer = LayoutWriter(root)
    committed = False
    try:
        config = writer.stage_bytes(b"{}")
        layer_digest = writer.stage_bytes(layer)
        digest = writer.commit(_manifest(config, [layer_digest]), mediatypes.OCI_MANIFEST, tag)
        committed = True
    finally:
        writer.close(committed)
    return digest


def test_commit_writes_a_complete_layout(tmp_path: Path) -> None:
    root = tmp_path / "new" / "layout"
    digest = _write_image(root, "v1")
    assert (root / LAYOUT_FILE).read_bytes() == b'{"imageLayoutVersion": "1.0.0"}'
    index = json.loads((root / "index.json").read_bytes())
    assert index == {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": mediatypes.OCI_MANIFEST,
                "digest": digest,
                "size": len(blob_path(root, digest).read_bytes()),
                "annotations": {REF_NAME: "v1"},
            }
        ],
    }
    for data in (b"{}", b"L"):
        assert blob_path(root, _digest(data)).read_bytes() == data
    assert _digest(blob_path(root, digest).read_bytes()) == digest
    assert not [p for p in root.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert sorted(p.name for p in root.iterdir()) == ["blobs", "index.json", "oci-layout"]


def test_layout_reads_back(tmp_path: Path) -> None:
    digest = _write_image(tmp_path / "l", "v1")
    layout = Layout(tmp_path / "l")
    entry = layout.find("v1")
    assert entry.digest == digest
    assert layout.find(None) == entry  # the only image
    manifest = layout.read_blob(digest, 1 << 20)
    assert _digest(manifest) == digest
    with layout.open_blob(_digest(b"L")) as handle:
        assert handle.read() == b"L"
    with pytest.raises(MalformedError, match="larger than expected"):
        layout.read_blob(digest, len(manifest) - 1)
    missing = "sha256:" + "0" * 64
    with pytest.raises(NotFoundError, match="is missing"):
        layout.read_blob(missing, 10)
    with pytest.raises(NotFoundError, match="is missing"), layout.open_blob(missing):
        pass
    with pytest.raises(NotFoundError, match="no such tag"):
        layout.find("v2")


def test_tags_replace_and_accumulate(tmp_path: Path) -> None:
    root = tmp_path / "l"
    first = _write_image(root, "v1", b"one")
    second = _write_image(root, "v2", b"two")
    replaced = _write_image(root, "v1", b"three")
    entries = Layout(root).index().manifests
    assert [(e.annotation(REF_NAME), e.digest) for e in entries] == [
        ("v2", second),
        ("v1", replaced),
    ]
    assert first != replaced
    with pytest.raises(UsageError, match=r"holds 2 images; name one of \['v1', 'v2'\]"):
        Layout(root).find(None)


def test_untagged_commits_are_kept_once_per_digest(tmp_path: Path) -> None:
    root = tmp_path / "l"
    a = _write_image(root, None, b"a")
    b = _write_image(root, None, b"b")
    again = _write_image(root, None, b"a")
    assert again == a
    assert [e.digest for e in Layout(root).index().manifests] == [b, a]


def test_failure_before_commit_removes_what_the_writer_created(tmp_path: Path) -> None:
    root = tmp_path / "missing-parent" / "layout"
    writer = LayoutWriter(root)
    writer.stage_bytes(b"blob")
    _, handle = writer.new_file()
    with handle:
        handle.write(b"partial")
    writer.close(committed=False)
    assert not (tmp_path / "missing-parent").exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_an_existing_layout_exactly_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "l"
    _write_image(root, "v1")
    before = _tree(root)
    writer = LayoutWriter(root)
    writer.stage_bytes(b"new blob")
    outside = tmp_path / "outside"
    outside.write_bytes(b"adopted")
    writer.stage(_digest(b"adopted"), outside)
    writer.close(committed=False)
    assert _tree(root) == before
    assert outside.read_bytes() == b"adopted"  # copied, not taken


def test_failed_index_swap_keeps_the_old_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "l"
    _write_image(root, "v1")
    index_before = (root / "index.json").read_bytes()
    writer = LayoutWriter(root)
    config = writer.stage_bytes(b"{}")

    def broken(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(layout_module, "atomic_write", broken)
    with pytest.raises(OSError, match="No space"):
        writer.commit(_manifest(config, []), mediatypes.OCI_MANIFEST, "v2")
    writer.close(committed=False)
    assert (root / "index.json").read_bytes() == index_before
    assert Layout(root).find("v1")
    with pytest.raises(NotFoundError):
        Layout(root).find("v2")
    assert not [p for p in root.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_empty_existing_directory_is_used_and_kept(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    writer = LayoutWriter(root)
    writer.close(committed=False)
    assert root.is_dir()
    assert list(root.iterdir()) == []
    _write_image(root, "v1")
    assert Layout(root).find("v1")


def test_a_directory_that_is_not_a_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an OCI image layout"):
        LayoutWriter(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]
    with pytest.raises(NotFoundError, match="no oci-layout file"):
        Layout(tmp_path)


def test_missing_or_broken_index(tmp_path: Path) -> None:
    (tmp_path / LAYOUT_FILE).write_bytes(b"{}")
    with pytest.raises(MalformedError, match=r"index\.json: missing"):
        Layout(tmp_path).index()
    (tmp_path / "index.json").write_bytes(b'{"schemaVersion":2}')
    with pytest.raises(MalformedError, match="invalid manifests"):
        Layout(tmp_path).find(None)


def test_has_blob_and_stage(tmp_path: Path) -> None:
    root = tmp_path / "l"
    _write_image(root, "v1")
    writer = LayoutWriter(root)
    try:
        assert writer.has_blob(_digest(b"L"))  # already in the layout
        assert not writer.has_blob(_digest(b"new"))
        path, handle = writer.new_file()
        with handle:
            handle.write(b"new")
        assert path.parent == writer.staging
        writer.stage(_digest(b"new"), path)
        assert writer.has_blob(_digest(b"new"))
        assert path.exists()  # adopted in place, no copy
        writer.commit(_manifest(_digest(b"{}"), [_digest(b"new")]), mediatypes.OCI_MANIFEST, "v2")
    finally:
        writer.close(committed=True)
    assert blob_path(root, _digest(b"new")).read_bytes() == b"new"
