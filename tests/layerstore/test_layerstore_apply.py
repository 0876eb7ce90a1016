"""The OCI changeset rules (image-spec layer.md), applied to a real directory tree.

Each test applies layers in order to one directory, as the store does to one
file system, and checks what the image spec says the result is. The
attacker in the escape tests writes the layer tar: it must not reach
anything outside the root, whatever symlinks the lower layers hold.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from layer_helpers import MTIME, Entry, d, f, hard, opaque, sym, tar_bytes, whiteout

from trustplane.errors import MalformedError
from trustplane.layerstore.apply import apply_layer


def apply(root: Path, *entries: Entry) -> None:
    apply_layer(io.BytesIO(tar_bytes(entries)), root)


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def test_whiteout_removes_a_lower_file_and_a_lower_directory_and_is_never_shown(
    root: Path,
) -> None:
    apply(root, d("etc"), f("etc/a", b"a"), f("etc/b", b"b"), d("opt"), d("opt/x"), f("opt/x/y"))
    apply(root, whiteout("etc/a"), whiteout("opt/x"))
    assert tree(root) == {"etc", "etc/b", "opt"}


def test_a_whiteout_does_not_hide_what_the_same_layer_adds_in_either_order(root: Path) -> None:
    apply(root, d("etc"), f("etc/kept", b"lower"), f("etc/gone", b"lower"))
    apply(
        root,
        f("etc/kept", b"this layer"),
        whiteout("etc/kept"),  # after the file: hides only the lower one
        whiteout("etc/gone"),
        whiteout("etc/new"),  # before the file
        f("etc/new", b"added"),
    )
    assert (root / "etc/kept").read_bytes() == b"this layer"
    assert (root / "etc/new").read_bytes() == b"added"
    assert not (root / "etc/gone").exists()


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_directory_hides_every_lower_child_and_keeps_this_layers(
    root: Path, marker_first: bool
) -> None:
    """The spec's own example: a/.wh..wh..opq with a/b/c/foo, in either order."""
    apply(root, d("a"), d("a/b"), d("a/b/c"), f("a/b/c/bar"), f("a/old"), f("keep"))
    new = [d("a"), d("a/b"), d("a/b/c"), f("a/b/c/foo")]
    apply(root, *([opaque("a"), *new] if marker_first else [*new, opaque("a")]))
    assert tree(root) == {"a", "a/b", "a/b/c", "a/b/c/foo", "keep"}


def test_changes_over_existing_paths(root: Path) -> None:
    apply(
        root,
        d("dir", 0o700),
        f("dir/child", b"kept"),
        d("was-dir"),
        f("was-dir/x"),
        f("was-file", b"f"),
        sym("was-link", "/etc"),
    )
    apply(
        root,
        d("dir", 0o751, uid=7, gid=8),  # dir over dir: attributes only
        f("was-dir", b"now a file"),
        d("was-file"),
        f("was-link", b"now a file"),
    )
    assert (root / "dir/child").read_bytes() == b"kept"
    info = os.lstat(root / "dir")
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o751, 7, 8)
    assert (root / "was-dir").read_bytes() == b"now a file"
    assert (root / "was-file").is_dir()
    assert not (root / "was-link").is_symlink()


def test_attributes_owner_mode_setuid_mtime_xattrs_devices_fifos(root: Path) -> None:
    capability = bytes.fromhex("0100000200100000000000000000000000000000")  # binary value
    apply(
        root,
        d("bin", 0o755, mtime=MTIME + 5),
        f("bin/su", b"#!", mode=0o4755, uid=0, gid=0),
        f("bin/owned", b"x", mode=0o640, uid=1234, gid=5678, mtime=MTIME + 10),
        f("bin/ping", b"p", xattrs={"security.capability": capability, "user.note": b"hi"}),
        Entry("dev-null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        Entry("dev-loop", tarfile.BLKTYPE, mode=0o660, devmajor=7, devminor=9),
        Entry("fifo", tarfile.FIFOTYPE, mode=0o600),
        sym("link", "/bin/su"),
    )
    assert stat.S_IMODE(os.lstat(root / "bin/su").st_mode) == 0o4755, "setuid survives chown"
    owned = os.lstat(root / "bin/owned")
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1234, 5678, 0o640)
    assert owned.st_mtime == MTIME + 10
    assert os.lstat(root / "bin").st_mtime == MTIME + 5, "directory times are set last"
    assert os.getxattr(root / "bin/ping", "security.capability") == capability
    assert os.getxattr(root / "bin/ping", "user.note") == b"hi"
    null = os.lstat(root / "dev-null")
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISBLK(os.lstat(root / "dev-loop").st_mode)
    assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
    assert str((root / "link").readlink()) == "/bin/su"


def test_hard_links_within_the_layer_and_to_a_lower_layer(root: Path) -> None:
    apply(root, d("usr"), f("usr/lower", b"L"))
    apply(
        root,
        f("usr/upper", b"U"),
        hard("usr/upper-link", "usr/upper"),
        hard("usr/lower-link", "./usr/lower"),
    )
    assert (root / "usr/upper").stat().st_ino == (root / "usr/upper-link").stat().st_ino
    assert (root / "usr/lower").stat().st_ino == (root / "usr/lower-link").stat().st_ino
    assert (root / "usr/lower").stat().st_nlink == 2


def test_missing_parent_directories_are_made_0755(root: Path) -> None:
    old = os.umask(0o077)
    try:
        apply(root, f("deep/er/file", b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((root / "deep").stat().st_mode) == 0o755
    assert (root / "deep/er/file").read_bytes() == b"x"


def test_a_whiteout_in_a_missing_directory_creates_nothing(root: Path) -> None:
    apply(root, whiteout("nowhere/file"), opaque("nothere"))
    assert tree(root) == set()


@pytest.mark.parametrize(
    "escape",
    [
        sym("etc", "/"),  # absolute: followed inside the root, not on the host
        sym("etc", "../../../../../../../.."),
        sym("etc", "../outside"),
    ],
)
def test_symlinks_of_a_lower_layer_never_lead_writes_out_of_the_root(
    tmp_path: Path, root: Path, escape: Entry
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    apply(root, escape)
    apply(root, f("etc/passwd", b"attacker"), d("etc/sub"), f("etc/sub/planted", b"attacker"))
    assert list(outside.iterdir()) == []
    inside = [p for p in tree(root) if p.endswith("passwd")]
    assert inside, "the write landed inside the root"
    assert all((root / p).read_bytes() == b"attacker" for p in inside)


def test_a_whiteout_through_a_symlink_removes_inside_the_root_only(
    tmp_path: Path, root: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"host file")
    apply(root, sym("up", str(tmp_path)), sym("top", "/"), d("srv"), f("srv/victim"))
    apply(root, whiteout("up/victim"))
    assert (root / "srv/victim").exists()
    apply(root, whiteout("top/srv/victim"))
    assert victim.read_bytes() == b"host file"
    assert not (root / "srv/victim").exists(), "the symlink was followed inside the root"


def test_names_that_climb_out_of_the_root_are_refused(root: Path) -> None:
    with pytest.raises(MalformedError, match="leads out of the root"):
        apply(root, f("../../escaped", b"x"))


def test_a_hard_link_to_nothing_is_refused(root: Path) -> None:
    with pytest.raises(MalformedError, match="hard link"):
        apply(root, hard("link", "missing"))


def test_a_truncated_tar_is_malformed(root: Path) -> None:
    raw = tar_bytes([f("big", b"x" * 5000)])
    with pytest.raises(MalformedError):
        apply_layer(io.BytesIO(raw[:1200]), root)
