"""The Docker volume plugin's driver and protocol, on real volumes (file backend, QEMU).

The block-storage service is a small in-process stand-in here (a file
backend and keys in memory, `create_volume` as the control plane calls it);
tests/integration/test_volume_plugin.py runs the plugin with the real
control plane and dockerd.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from trustplane.api.volume_spec import BackendKind, VolumeTypeSpec
from trustplane.errors import (
    Forbidden,
    IntegrityError,
    MalformedError,
    NotFoundError,
    ToolError,
    UsageError,
)
from trustplane.tools import Executor, mount_points
from trustplane.volumes.attachers.docker_plugin.app import create_app
from trustplane.volumes.attachers.docker_plugin.driver import VolumeDriver
from trustplane.volumes.attachers.docker_plugin.lease import LeaseUse
from trustplane.volumes.attachers.docker_plugin.opener import open_plaintext
from trustplane.volumes.attachers.docker_plugin.protocol import CONTENT_TYPE
from trustplane.volumes.attachers.docker_plugin.service import AttachMaterial, VolumeInfo
from trustplane.volumes.backends.file import FileBackend
from trustplane.volumes.volume import CreatedVolume, create_volume, delete_volume

SIZE = "16M"


class LocalService:
    """The block-storage service's calls over a file backend, keys in memory."""

    def __init__(self, root: Path) -> None:
        self.backend = FileBackend(root)
        self.volumes: dict[str, CreatedVolume] = {}
        self.keys: dict[str, bytes] = {}
        self.refused: set[str] = set()
        self.attached: set[str] = set()

    def create(self, name: str, volume_type: str, size: int) -> VolumeInfo:
        key = secrets.token_bytes(32)
        spec = VolumeTypeSpec(backend=BackendKind.FILE)
        self.volumes[name] = create_volume(self.backend, spec, name, size, key)
        self.keys[name] = key
        return VolumeInfo(name, volume_type, size)

    def delete(self, name: str) -> None:
        created = self.volumes.pop(name)
        self.keys.pop(name)
        delete_volume(self.backend, created.location)

    def get(self, name: str) -> VolumeInfo:
        if name not in self.volumes:
            raise NotFoundError(f"volume {name} does not exist")
        return VolumeInfo(name, "secure", self.volumes[name].size)

    def list(self) -> list[VolumeInfo]:
        return [self.get(name) for name in sorted(self.volumes)]

    def attach(self, name: str) -> AttachMaterial:
        if name in self.refused:
            raise Forbidden(f"policy refuses volume.attach of volume:{name}")
        self.get(name)
        created = self.volumes[name]
        assert created.engine is not None
        self.attached.add(name)
        return AttachMaterial(
            name, created.location, created.engine, created.fingerprint, self.keys[name]
        )

    def detached(self, name: str) -> None:
        self.attached.discard(name)

    def report_lease_uses(self, uses: Sequence[LeaseUse]) -> None:
        raise AssertionError("no key lease here")


@pytest.fixture
def service(tmp_path: Path) -> LocalService:
    return LocalService(tmp_path / "store")


@pytest.fixture
def driver(tmp_path: Path, service: LocalService) -> Iterator[VolumeDriver]:
    made = VolumeDriver(service, tmp_path / "root")
    made.start()
    yield made
    made.close_all()
    made.stop()


def _leftovers(root: Path) -> list[str]:
    """Mounts, loop devices and daemons of the plugin still on the host."""
    prefix = str(root.resolve()) + "/"
    found = [p for p in mount_points(Executor()) if p.startswith(prefix)]
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
                           capture_output=True, text=True, check=False).stdout  # fmt: skip
    found += [line for line in loops.split() if line.startswith(prefix)]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-storage-daemon" in cmdline and prefix.encode() in cmdline:
                found.append(f"pid {entry.name}")
    return found


def test_mounts_are_counted_per_caller_and_the_last_unmount_closes(
    driver: VolumeDriver, service: LocalService
) -> None:
    driver.create("v1", {"type": "secure", "size": SIZE})
    assert service.attached == set()  # the file system was made; the key was let go
    point = Path(driver.mount("v1", "a"))
    assert driver.mount("v1", "a") == str(point)  # a repeated mount is one caller
    assert driver.mount("v1", "b") == str(point)
    (point / "f").write_text("data")
    driver.unmount("v1", "stranger")  # not a caller: ignored while others use it
    driver.unmount("v1", "a")
    assert (point / "f").read_text() == "data"
    assert driver.get("v1").status["mounts"] == 1
    driver.unmount("v1", "b")
    assert _leftovers(driver.root) == []
    assert driver.path("v1") == ""
    assert service.attached == set()
    driver.unmount("v1", "b")  # again: nothing open, nothing to do


def test_a_busy_file_system_keeps_the_volume_open_and_whole(driver: VolumeDriver) -> None:
    driver.create("v-busy", {"type": "secure", "size": SIZE})
    point = Path(driver.mount("v-busy", "a"))
    holder = subprocess.Popen(["sleep", "600"], cwd=point)
    try:
        with pytest.raises(ToolError, match="umount"):
            driver.unmount("v-busy", "a")
        assert driver.path("v-busy") == str(point)  # still open, still counted
        (point / "still").write_text("writable")
    finally:
        holder.kill()
        holder.wait()
    driver.unmount("v-busy", "a")
    assert _leftovers(driver.root) == []


def test_a_refused_release_leaves_nothing(driver: VolumeDriver, service: LocalService) -> None:
    driver.create("v-no", {"type": "secure", "size": SIZE})
    service.refused.add("v-no")
    with pytest.raises(Forbidden, match=r"volume\.attach"):
        driver.mount("v-no", "a")
    assert _leftovers(driver.root) == []
    assert list((driver.root / "mounts").iterdir()) == []


def test_a_create_whose_key_is_refused_deletes_the_volume_again(
    driver: VolumeDriver, service: LocalService
) -> None:
    service.refused.add("v-half")
    with pytest.raises(Forbidden):
        driver.create("v-half", {"type": "secure", "size": SIZE})
    assert "v-half" not in service.volumes
    assert not (service.backend.root / "v-half.img").exists()


def test_a_volume_without_a_file_system_is_refused_never_formatted(
    driver: VolumeDriver, service: LocalService
) -> None:
    service.create("raw", "secure", 16 << 20)  # made beside the plugin: no file system
    before = (service.backend.root / "raw.img").read_bytes()
    with pytest.raises(IntegrityError, match="holds no file system"):
        driver.mount("raw", "a")
    assert _leftovers(driver.root) == []
    assert (service.backend.root / "raw.img").read_bytes() == before


def test_a_replaced_volume_is_refused_before_it_is_opened(
    driver: VolumeDriver, service: LocalService
) -> None:
    """Attacker: write access to the storage, swapping in a volume whose key they know."""
    driver.create("victim", {"type": "secure", "size": SIZE})
    driver.create("theirs", {"type": "secure", "size": SIZE})
    (service.backend.root / "theirs.img").replace(service.backend.root / "victim.img")
    service.keys["victim"] = service.keys["theirs"]  # even with the matching key
    with pytest.raises(IntegrityError, match="not the recorded"):
        driver.mount("victim", "a")
    assert _leftovers(driver.root) == []


def test_remove_is_refused_while_mounted(driver: VolumeDriver, service: LocalService) -> None:
    driver.create("v-rm", {"type": "secure", "size": SIZE})
    driver.mount("v-rm", "a")
    with pytest.raises(UsageError, match="mounted on this node"):
        driver.remove("v-rm")
    driver.unmount("v-rm", "a")
    driver.remove("v-rm")
    assert "v-rm" not in service.volumes


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"size": SIZE}, "needs --opt type=TYPE"),
        ({"type": "secure"}, "needs --opt size=SIZE"),
        ({"type": "secure", "size": "lots"}, "not a size"),
        ({"type": "secure", "size": SIZE, "fs": "xfs"}, "unknown option 'fs'"),
    ],
)
def test_create_options_are_checked_before_anything_is_made(
    driver: VolumeDriver, service: LocalService, opts: dict[str, str], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        driver.create("v-opt", opts)
    assert service.volumes == {}


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 200, "a,b"])
def test_names_that_are_not_path_components_are_refused(driver: VolumeDriver, name: str) -> None:
    for call in (lambda: driver.mount(name, "a"), lambda: driver.create(name, {})):
        with pytest.raises(UsageError, match="volume name"):
            call()
    assert list((driver.root / "mounts").iterdir()) == []


def test_a_restarted_driver_adopts_what_is_open(
    tmp_path: Path, service: LocalService, driver: VolumeDriver
) -> None:
    driver.create("v-keep", {"type": "secure", "size": SIZE})
    point = Path(driver.mount("v-keep", "a"))
    (point / "f").write_text("before")
    driver.stop()  # the plugin stops; the volume stays open for its container
    again = VolumeDriver(service, tmp_path / "root")
    report = again.start()
    try:
        assert report.adopted == ["v-keep"]
        assert report.cleared == []
        (point / "g").write_text("after")
        again.unmount("v-keep", "a")
        assert _leftovers(again.root) == []
        reopened = Path(again.mount("v-keep", "b"))
        assert (reopened / "f").read_text() + (reopened / "g").read_text() == "beforeafter"
        again.unmount("v-keep", "b")
    finally:
        again.close_all()
        again.stop()


def test_start_clears_what_a_plugin_killed_mid_mount_left(
    tmp_path: Path, service: LocalService, driver: VolumeDriver
) -> None:
    """Killed after the daemon started, before the state was written: unknown to the
    state file, found under the root and stopped."""
    driver.create("v-orphan", {"type": "secure", "size": SIZE})
    orphan = open_plaintext(driver.executor, service.attach("v-orphan"), driver.run_dir)
    orphan.keep_past_exit()
    assert _leftovers(driver.root) != []
    driver.stop()
    again = VolumeDriver(service, tmp_path / "root")
    report = again.start()
    try:
        assert report.adopted == []
        assert any("qemu-storage-daemon" in entry for entry in report.cleared)
        assert _leftovers(again.root) == []
        assert list(again.run_dir.iterdir()) == []
    finally:
        again.stop()


def test_one_plugin_per_root_and_a_damaged_state_is_refused(
    tmp_path: Path, service: LocalService, driver: VolumeDriver
) -> None:
    with pytest.raises(UsageError, match="another volume plugin"):
        VolumeDriver(service, tmp_path / "root").start()
    driver.stop()
    (driver.root / "state.json").write_text('{"volumes": {"x": {"name": 1}}}')
    with pytest.raises(MalformedError, match="refusing to guess"):
        VolumeDriver(service, tmp_path / "root").start()


def test_the_protocol_answers_in_dockers_shapes(driver: VolumeDriver) -> None:
    client = TestClient(create_app(driver))

    def post(path: str, body: object = None) -> dict[str, object]:
        answer = client.post(path, json=body) if body is not None else client.post(path)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == CONTENT_TYPE
        result: dict[str, object] = answer.json()
        return result

    assert post("/Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    assert post("/VolumeDriver.Capabilities", {}) == {"Capabilities": {"Scope": "global"}}
    assert post("/VolumeDriver.List", {}) == {"Volumes": [], "Err": ""}
    assert post("/VolumeDriver.Create", {"Name": "p1", "Opts": {"type": "t", "size": SIZE}}) == {
        "Err": ""
    }
    mounted = post("/VolumeDriver.Mount", {"Name": "p1", "ID": "c1"})
    assert mounted["Err"] == ""
    assert mounted["Mountpoint"] == str(driver.mounts_dir / "p1")
    assert post("/VolumeDriver.Path", {"Name": "p1"})["Mountpoint"] == mounted["Mountpoint"]
    got = post("/VolumeDriver.Get", {"Name": "p1"})
    assert got["Volume"] == {
        "Name": "p1", "Mountpoint": mounted["Mountpoint"],
        "Status": {"type": "secure", "size": 16 << 20, "mounts": 1},
    }  # fmt: skip
    assert post("/VolumeDriver.Unmount", {"Name": "p1", "ID": "c1"}) == {"Err": ""}
    missing = post("/VolumeDriver.Get", {"Name": "nope"})
    assert missing["Err"] == "volume nope does not exist"
    assert "not JSON" in str(client.post("/VolumeDriver.Get", content=b"{").json()["Err"])
    assert "Name" in str(post("/VolumeDriver.Mount", {"ID": "x"})["Err"])
    assert "volume name" in str(post("/VolumeDriver.Mount", {"Name": "../x", "ID": "x"})["Err"])
    assert post("/VolumeDriver.Remove", {"Name": "p1"}) == {"Err": ""}
