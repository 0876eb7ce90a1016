"""The storage components' start-up refusals and generated configuration (no daemons)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from trustplane.embedded.ceph import start_ceph
from trustplane.embedded.containerd import render_config, start_containerd
from trustplane.embedded.libvirtd import start_libvirtd
from trustplane.embedded.tgtd import start_tgtd
from trustplane.errors import UnavailableError, UsageError

STARTERS: dict[str, tuple[Callable[[Path], object], str]] = {
    "ceph": (start_ceph, "ceph-"),
    "tgtd": (start_tgtd, "tgt"),
    "libvirtd": (start_libvirtd, "libvirt-daemon"),
    "containerd": (start_containerd, "containerd"),
}


@pytest.mark.parametrize("name", sorted(STARTERS))
def test_a_missing_binary_is_one_clear_error(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start, package = STARTERS[name]
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(UnavailableError, match=f"install the Debian package {package}"):
        start(tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is left behind"


def test_ceph_refuses_names_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="pool name"):
        start_ceph(tmp_path, pool="bad pool")
    with pytest.raises(UsageError, match="user name"):
        start_ceph(tmp_path, user="admin")


def test_containerd_config_disables_cri_and_names_each_proxy(tmp_path: Path) -> None:
    import tomllib

    config = tomllib.loads(
        render_config(
            tmp_path / "root",
            tmp_path / "state",
            tmp_path / "c.sock",
            {"trustplane": tmp_path / 'we"ird.sock', "b": tmp_path / "b.sock"},
        )
    )
    assert config["version"] == 2
    assert "io.containerd.grpc.v1.cri" in config["disabled_plugins"]
    assert config["grpc"]["address"] == str(tmp_path / "c.sock")
    assert config["proxy_plugins"] == {
        "trustplane": {"type": "snapshot", "address": str(tmp_path / 'we"ird.sock')},
        "b": {"type": "snapshot", "address": str(tmp_path / "b.sock")},
    }
    with pytest.raises(UsageError, match="snapshotter name"):
        start_containerd(tmp_path, proxy_snapshotters={"Bad Name": tmp_path / "x.sock"})
