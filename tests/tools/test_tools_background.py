"""Long-running tools: qemu-storage-daemon in the foreground, ready, stopped, no stale mount.

The attacker reads the filesystem while the daemon serves (the key file must
be gone once it is ready) and after it stopped or crashed (no FUSE mount may
be left, dead or alive).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from trustplane.errors import DecryptionKeyError, ToolError, ToolTimeout
from trustplane.tools import (
    QEMU_PBKDF_CALIBRATION,
    Executor,
    LocalRunner,
    SecretFile,
    ToolProcess,
    is_mounted,
)

WRONG_KEY = {"Invalid password, cannot unlock any keyslot": DecryptionKeyError}


@pytest.fixture
def secret_root(tmp_path: Path) -> Path:
    root = tmp_path / "secrets"
    root.mkdir()
    return root


@pytest.fixture
def executor(secret_root: Path) -> Executor:
    return Executor(LocalRunner(secret_root=secret_root), timeout=60)


@pytest.fixture(scope="module")
def luks_volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A 16 MiB LUKS1 file made by qemu-img, and its passphrase."""
    image = tmp_path_factory.mktemp("volume") / "volume.luks"
    key = os.urandom(32).hex().encode()
    Executor().run(
        [
            "qemu-img",
            "create",
            "--object",
            SecretFile(key, "secret,id=s0,file={}"),
            "-f",
            "luks",
            "-o",
            "key-secret=s0,iter-time=10",
            str(image),
            "16M",
        ],
        retry=QEMU_PBKDF_CALIBRATION,
    )
    return image, key


def _export(executor: Executor, image: Path, key: bytes, mountpoint: Path) -> ToolProcess:
    mountpoint.touch()
    return executor.start(
        [
            "qemu-storage-daemon",
            "--object",
            SecretFile(key, "secret,id=s0,file={}"),
            "--blockdev",
            f"driver=file,node-name=file0,filename={image}",
            "--blockdev",
            "driver=luks,node-name=luks0,file=file0,key-secret=s0",
            "--export",
            f"type=fuse,id=e0,node-name=luks0,mountpoint={mountpoint},writable=on",
        ],
        ready=lambda: is_mounted(executor, mountpoint),
        mounts=[mountpoint],
        failures=WRONG_KEY,
        grace=5,
    )


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def test_fuse_export_serves_plaintext_and_its_key_file_is_gone_once_ready(
    executor: Executor, secret_root: Path, tmp_path: Path, luks_volume: tuple[Path, bytes]
) -> None:
    image, key = luks_volume
    mountpoint = tmp_path / "export"
    marker = b"plaintext marker " + os.urandom(8).hex().encode()
    with _export(executor, image, key, mountpoint) as daemon:
        assert daemon.running()
        assert list(secret_root.iterdir()) == [], "the key file goes once the daemon is ready"
        with mountpoint.open("r+b") as plain:
            plain.seek(1 << 20)
            plain.write(marker)
            plain.flush()
            os.fsync(plain.fileno())
            plain.seek(1 << 20)
            assert plain.read(len(marker)) == marker
        pid = daemon.started.pid  # type: ignore[attr-defined]
    assert _gone(pid)
    assert not is_mounted(executor, mountpoint)
    raw = image.read_bytes()
    assert raw.startswith(b"LUKS\xba\xbe")
    assert marker not in raw
    assert key not in raw


def test_a_crashed_daemon_leaves_no_stale_fuse_mount(
    executor: Executor, tmp_path: Path, luks_volume: tuple[Path, bytes]
) -> None:
    image, key = luks_volume
    mountpoint = tmp_path / "export"
    daemon = _export(executor, image, key, mountpoint)
    pid = daemon.started.pid  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGKILL)
    assert _gone(pid)
    assert is_mounted(executor, mountpoint), "the kernel keeps a dead FUSE mount"
    daemon.stop()
    assert not is_mounted(executor, mountpoint)
    daemon.stop()  # idempotent


def test_wrong_key_fails_at_start_with_one_line_and_leaves_nothing(
    executor: Executor, secret_root: Path, tmp_path: Path, luks_volume: tuple[Path, bytes]
) -> None:
    image, _ = luks_volume
    mountpoint = tmp_path / "export"
    with pytest.raises(DecryptionKeyError) as caught:
        _export(executor, image, b"not the key", mountpoint)
    assert str(caught.value).startswith("qemu-storage-daemon failed with exit status 1 while")
    assert str(caught.value).endswith("Invalid password, cannot unlock any keyslot")
    assert "\n" not in str(caught.value)
    assert not is_mounted(executor, mountpoint)
    assert list(secret_root.iterdir()) == []


def test_not_ready_in_time_is_stopped_with_its_group(
    executor: Executor, secret_root: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    script = 'sleep 300 & echo $$ $! > "$2"; test -s "$1" && echo "still starting" >&2; wait'
    with pytest.raises(ToolTimeout, match=r"was not ready within 0.5 s.*: still starting$"):
        executor.start(
            ["sh", "-c", script, "sh", SecretFile(b"k3y"), str(pid_file)],
            ready=lambda: False,
            ready_timeout=0.5,
            grace=2,
        )
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2
    assert all(_gone(pid) for pid in pids)
    assert list(secret_root.iterdir()) == []


def test_stop_escalates_to_sigkill_after_the_grace_period(
    executor: Executor, tmp_path: Path
) -> None:
    trapped = tmp_path / "trapped"
    process = executor.start(
        [
            "sh",
            "-c",
            "trap '' TERM; touch \"$1\"; echo up; while :; do sleep 0.1; done",
            "sh",
            str(trapped),
        ],
        ready=trapped.exists,
        grace=0.5,
    )
    pid = process.started.pid  # type: ignore[attr-defined]
    process.stop()
    assert _gone(pid)
    assert process.started.poll() == -signal.SIGKILL, "SIGTERM was ignored, SIGKILL was not"
    assert process.last_output_line() == "up"


def test_a_tool_that_exits_while_starting_is_one_error(executor: Executor) -> None:
    with pytest.raises(ToolError, match=r"^sh failed with exit status 7 while starting: bad$"):
        executor.start(["sh", "-c", "echo bad >&2; exit 7"], ready=lambda: False)
