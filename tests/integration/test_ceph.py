"""The embedded one-node Ceph cluster: RBD, QEMU's LUKS on RBD, librbd's own LUKS2.

What the encrypted-volume work relies on, shown against the real cluster: a
client user that is not admin, `rbd` image life cycle, `qemu-img create -f
luks` straight onto `rbd:pool/image`, no plaintext in any RADOS object, and
`rbd encryption format … luks2` with its key enforced.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from storage_helpers import (
    EXECUTOR,
    LUKS_MAGIC,
    key_object,
    marker_block,
    passphrase,
    qemu_img_create_luks,
    qemu_io_read,
    qemu_io_write,
)

from trustplane.embedded.ceph import RunningCeph
from trustplane.errors import ToolError, UnavailableError
from trustplane.tools import SecretFile


def _image_name() -> str:
    return f"img-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def rbd_image(ceph: RunningCeph) -> Iterator[str]:
    """A fresh image name in the pool; whatever the test made under it is removed."""
    name = _image_name()
    yield name
    if name in ceph.run_as_client("rbd", "ls", ceph.pool).split():
        ceph.run_as_client("rbd", "rm", f"{ceph.pool}/{name}", "--no-progress")


def _rbd_opts(ceph: RunningCeph, image: str) -> str:
    """QEMU's blockdev options for the image, as the client user with its conf."""
    return (
        f"file.driver=rbd,file.pool={ceph.pool},file.image={image},"
        f"file.user={ceph.client.user},file.conf={ceph.client.conf_file}"
    )


def _create_luks(ceph: RunningCeph, image: str, key: bytes, size: str) -> None:
    """`qemu-img create -f luks` onto rbd:POOL/IMAGE; a failed try's empty image is removed."""

    def remove_leftover() -> None:
        if image in ceph.run_as_client("rbd", "ls", ceph.pool).split():
            ceph.run_as_client("rbd", "rm", f"{ceph.pool}/{image}", "--no-progress")

    qemu_img_create_luks(ceph.qemu_rbd_uri(image), key, size, cleanup=remove_leftover)


def _objects(ceph: RunningCeph, image: str) -> dict[str, bytes]:
    """Every RADOS object of the image's data, fetched with `rados get` as the client."""
    info = json.loads(ceph.run_as_client("rbd", "info", f"{ceph.pool}/{image}", "--format", "json"))
    prefix = info["block_name_prefix"]
    names = sorted(
        name
        for name in ceph.run_as_client("rados", "-p", ceph.pool, "ls").split()
        if name.startswith(prefix + ".")
    )
    out = {}
    scratch = ceph.work_dir / "tmp"
    for name in names:
        target = scratch / f"{name}.obj"
        ceph.run_as_client("rados", "-p", ceph.pool, "get", name, str(target))
        out[name] = target.read_bytes()
        target.unlink()
    return out


def test_cluster_is_healthy_with_one_osd_and_clean_pgs(ceph: RunningCeph) -> None:
    status = ceph.ceph_json("status")
    assert isinstance(status, dict)
    assert status["health"]["status"] == "HEALTH_OK", status["health"]
    osdmap = status["osdmap"]
    assert (osdmap["num_osds"], osdmap["num_up_osds"], osdmap["num_in_osds"]) == (1, 1, 1)
    pgmap = status["pgmap"]
    assert pgmap["num_pgs"] > 0
    assert [s["state_name"] for s in pgmap["pgs_by_state"]] == ["active+clean"]
    pool = ceph.ceph_json("osd", "pool", "get", ceph.pool, "size")
    assert isinstance(pool, dict)
    assert pool["size"] == 1
    apps = ceph.ceph_json("osd", "pool", "application", "get", ceph.pool)
    assert isinstance(apps, dict)
    assert "rbd" in apps
    # Everything listens on loopback only.
    mon = ceph.ceph_json("mon", "dump")
    assert isinstance(mon, dict)
    addrs = [a["addr"] for m in mon["mons"] for a in m["public_addrs"]["addrvec"]]
    assert addrs
    assert all(a.startswith("127.0.0.1:") for a in addrs), addrs


def test_client_user_is_not_admin(ceph: RunningCeph) -> None:
    """The client user has the rbd profile on its pool and nothing more."""
    assert ceph.client.user != "admin"
    with pytest.raises(UnavailableError, match=r"(?i)access denied|permission denied|EACCES"):
        ceph.run_as_client("ceph", "osd", "pool", "create", "not-allowed", "1")
    with pytest.raises(UnavailableError, match=r"(?i)access denied|permission denied|EACCES"):
        ceph.run_as_client("ceph", "auth", "ls")
    # Its keyring is private.
    assert ceph.client.keyring_file.stat().st_mode & 0o777 == 0o600
    assert ceph.client.keyring_file.parent.stat().st_mode & 0o777 == 0o700
    # The key as libvirt takes it: a cephx key (type 1, 16-byte secret).
    raw = ceph.client.key_bytes
    assert len(raw) == 28
    assert raw[:2] == b"\x01\x00"
    assert ceph.client.key not in repr(ceph.client)


def test_ceph_tools_ignore_a_foreign_pythonpath(
    ceph: RunningCeph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our tests export PYTHONPATH; the `ceph` CLI (Debian's python3) must not see it."""
    (tmp_path / "rados.py").write_text("raise ImportError('a foreign rados module')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    # Leaked, it breaks the tool...
    leaked = subprocess.run(
        ["ceph", "--conf", str(ceph.conf_file), "health"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert leaked.returncode != 0
    assert "foreign rados module" in leaked.stderr
    # ...and the cluster's own calls scrub it.
    assert ceph.run("ceph", "health").strip() == "HEALTH_OK"


def test_rbd_create_info_rm(ceph: RunningCeph, rbd_image: str) -> None:
    spec = f"{ceph.pool}/{rbd_image}"
    ceph.run_as_client("rbd", "create", spec, "--size", "64M")
    info = json.loads(ceph.run_as_client("rbd", "info", spec, "--format", "json"))
    assert info["name"] == rbd_image
    assert info["size"] == 64 * 1024**2
    assert rbd_image in ceph.run_as_client("rbd", "ls", ceph.pool).split()
    ceph.run_as_client("rbd", "rm", spec, "--no-progress")
    assert rbd_image not in ceph.run_as_client("rbd", "ls", ceph.pool).split()
    with pytest.raises(UnavailableError, match="No such file"):
        ceph.run_as_client("rbd", "info", spec)


def test_qemu_luks_on_rbd_leaves_no_plaintext_in_rados(ceph: RunningCeph, rbd_image: str) -> None:
    key = secrets.token_bytes(32)
    marker = b"trustplane-rbd-marker-" + secrets.token_hex(8).encode()

    _create_luks(ceph, rbd_image, key, "32M")
    opts = _rbd_opts(ceph, rbd_image)
    block = marker_block(marker, 64 * 1024)
    qemu_io_write(opts, key, 1024 * 1024, block)
    assert qemu_io_read(opts, key, 1024 * 1024, len(block)) == block

    objects = _objects(ceph, rbd_image)
    first = min(objects)
    assert first.endswith(".0000000000000000")
    assert objects[first].startswith(LUKS_MAGIC)
    for name, data in objects.items():
        assert marker not in data, f"plaintext marker in RADOS object {name}"

    # The wrong key opens nothing.
    with pytest.raises(ToolError, match="Invalid password"):
        qemu_io_read(opts, secrets.token_bytes(32), 0, 512)


def test_qemu_reaches_rbd_with_libvirts_values_and_no_ceph_conf(
    ceph: RunningCeph, rbd_image: str
) -> None:
    """Monitor host:port, user and base64 key (as libvirt passes them) suffice."""
    key = secrets.token_bytes(32)
    _create_luks(ceph, rbd_image, key, "8M")
    block = marker_block(b"libvirt-values-", 4096)
    qemu_io_write(_rbd_opts(ceph, rbd_image), key, 0, block)
    opts = (
        f"file.driver=rbd,file.pool={ceph.pool},file.image={rbd_image},"
        f"file.user={ceph.client.user},file.key-secret=cephx,"
        f"file.server.0.host={ceph.client.mon_host},"
        f"file.server.0.port={ceph.client.mon_port},"
        "file.conf=/dev/null"
    )
    cephx = SecretFile(ceph.client.key.encode("ascii"), "secret,id=cephx,file={},format=base64")
    argv = [
        "qemu-io",
        "--object", cephx,
        "--object", key_object(key),
        "--image-opts", f"driver=luks,key-secret=s0,{opts}",
        "-c", "read -P 0x6c 0 1",
    ]  # fmt: skip
    # The first byte of the marker block is 'l' (0x6c): the volume opened and decrypted.
    out = EXECUTOR.run(argv).text
    assert "read 1/1 bytes" in out, out


def test_librbd_luks2_encryption_format(ceph: RunningCeph, rbd_image: str) -> None:
    """`rbd encryption format … luks2 PASSFILE`: a LUKS2 header; only its key opens it."""
    spec = f"{ceph.pool}/{rbd_image}"
    key = secrets.token_bytes(32)
    ceph.run_as_client("rbd", "create", spec, "--size", "64M")
    passfile = SecretFile(passphrase(key))
    ceph.run_as_client("rbd", "encryption", "format", spec, "luks2", passfile, timeout=180)
    objects = _objects(ceph, rbd_image)
    header = objects[min(objects)]
    assert header.startswith(LUKS_MAGIC)
    assert header[6:8] == b"\x00\x02", "LUKS version 2"

    def open_with(candidate: bytes) -> str:
        argv = [
            "qemu-io",
            "--object", key_object(candidate),
            "--image-opts",
            f"driver=rbd,pool={ceph.pool},image={rbd_image},"
            f"user={ceph.client.user},conf={ceph.client.conf_file},"
            "encrypt.format=luks2,encrypt.key-secret=s0",
            "-c", "read 0 4096",
        ]  # fmt: skip
        return EXECUTOR.run(argv, timeout=180).text

    assert "read 4096/4096 bytes" in open_with(key)
    with pytest.raises(ToolError, match="encryption load fail"):
        open_with(secrets.token_bytes(32))
