"""The executor runs real tools with secrets only where the promise allows them.

The attacker here can read every process's `/proc/<pid>/cmdline` and
`/proc/<pid>/environ` while the tool runs, and the filesystem after the call
returns (success, failure or timeout): the secret must be in none of them.
"""

from __future__ import annotations

import base64
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trustplane.errors import DecryptionKeyError, ToolError, ToolTimeout, TrustplaneError
from trustplane.tools import (
    QEMU_PBKDF_CALIBRATION,
    Executor,
    LocalRunner,
    Retry,
    SecretFd,
    SecretFile,
    ToolResult,
)
from trustplane.tools.secret_dir import PREFIX, SecretDir

SECRET_FILE_VALUE = b"file-secret-" + os.urandom(8).hex().encode()
SECRET_FD_VALUE = b"fd-secret-" + os.urandom(8).hex().encode()
SECRET_STDIN_VALUE = b"stdin-secret-" + os.urandom(8).hex().encode()


def _forms(value: bytes) -> list[bytes]:
    """The secret as an attacker would look for it: raw, hex, base64."""
    return [value, value.hex().encode(), base64.b64encode(value)]


def _session_pids(sid: int) -> set[int]:
    """Processes in session `sid` (the executor starts each tool in its own)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # state ppid pgrp session ...
            found.add(int(entry.name))
    return found


def _children() -> set[int]:
    mine = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == mine:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


class _InThread:
    """Run an executor call in a thread; the test watches the tool meanwhile."""

    def __init__(self, call: Callable[[], ToolResult]) -> None:
        self.result: ToolResult | None = None
        self.error: BaseException | None = None
        self._before = _children()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._call = call
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as exc:
            self.error = exc

    def child(self, within: float = 10.0) -> int:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            new = _children() - self._before
            if new:
                return new.pop()
            time.sleep(0.01)
        raise AssertionError("the tool never started")

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive()


def _wait_for(path: Path, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture
def secret_root(tmp_path: Path) -> Path:
    root = tmp_path / "secrets"
    root.mkdir()
    return root


@pytest.fixture
def executor(secret_root: Path) -> Executor:
    return Executor(LocalRunner(secret_root=secret_root), timeout=60)


def _private_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(PREFIX)]


def test_secrets_reach_the_tool_but_not_its_cmdline_or_environ(
    executor: Executor, secret_root: Path, tmp_path: Path
) -> None:
    received = tmp_path / "received"
    go = tmp_path / "go"
    ready = tmp_path / "ready"
    # The tool copies what it got to `received`, then waits, so that the test
    # can look at it (and at the sleep it forked) while it runs.
    script = (
        'cat "$1" > "$3"; printf "|" >> "$3"; cat "$2" >> "$3"; printf "|" >> "$3";'
        ' cat >> "$3"; sleep 60 & touch "$4"; while [ ! -e "$5" ]; do sleep 0.02; done; kill $!'
    )
    call = _InThread(
        lambda: executor.run(
            [
                "sh",
                "-c",
                script,
                "sh",
                SecretFile(SECRET_FILE_VALUE),
                SecretFd(SECRET_FD_VALUE),
                str(received),
                str(ready),
                str(go),
            ],
            stdin=SECRET_STDIN_VALUE,
        )
    )
    leader = call.child()
    _wait_for(ready)
    group = _session_pids(leader)
    assert leader in group
    assert len(group) >= 2, "the tool and the sleep it forked"
    read = set()
    for pid in group:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue  # one of the wait loop's short `sleep 0.02`, gone meanwhile
        read.add(pid)
        for secret in (SECRET_FILE_VALUE, SECRET_FD_VALUE, SECRET_STDIN_VALUE):
            for form in _forms(secret):
                assert form not in cmdline
                assert form not in environ
    # The tool itself and the long sleep it forked stay until `go`: both were read.
    assert leader in read
    assert len(read) >= 2, "the tool and the sleep it forked"
    # While it runs the file exists, 0600, in a 0700 directory of its own.
    (private,) = _private_dirs(secret_root)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    (secret_file,) = list(private.iterdir())
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert str(secret_file).encode() in Path(f"/proc/{leader}/cmdline").read_bytes()
    # The fd argument is a /dev/fd path, not the value.
    assert b"/dev/fd/" in Path(f"/proc/{leader}/cmdline").read_bytes()
    go.touch()
    call.join()
    assert call.error is None
    assert call.result is not None
    assert call.result.returncode == 0
    assert received.read_bytes() == b"|".join(
        [SECRET_FILE_VALUE, SECRET_FD_VALUE, SECRET_STDIN_VALUE]
    )
    assert _private_dirs(secret_root) == []


def test_secret_fd_can_be_read_twice(executor: Executor) -> None:
    """Tools that stat or reopen a key file (cryptsetup) get a real file, not a pipe."""
    result = executor.run(["sh", "-c", 'cat "$1"; cat "$1"', "sh", SecretFd(b"twice")])
    assert result.stdout == b"twicetwice"


@pytest.mark.parametrize("outcome", ["fails", "times out"])
def test_secret_file_is_gone_when_the_tool_fails_or_times_out(
    executor: Executor, secret_root: Path, outcome: str
) -> None:
    if outcome == "fails":
        argv = ["sh", "-c", 'test -s "$1" && exit 3', "sh", SecretFile(SECRET_FILE_VALUE)]
        with pytest.raises(ToolError, match=r"^sh failed with exit status 3"):
            executor.run(argv)
    else:
        argv = ["sh", "-c", 'test -s "$1" && sleep 60', "sh", SecretFile(SECRET_FILE_VALUE)]
        with pytest.raises(ToolTimeout, match=r"^sh did not finish within 0.5 s"):
            executor.run(argv, timeout=0.5)
    assert list(secret_root.iterdir()) == []


def test_error_names_the_tool_and_its_last_stderr_line_never_the_secret(
    executor: Executor,
) -> None:
    script = 'echo "first line" >&2; echo "the key was $(cat "$1") and $(cat)" >&2; exit 2'
    with pytest.raises(ToolError) as caught:
        executor.run(
            ["sh", "-c", script, "sh", SecretFile(SECRET_FILE_VALUE)], stdin=SECRET_STDIN_VALUE
        )
    message = str(caught.value)
    assert message == "sh failed with exit status 2: the key was [secret] and [secret]"
    assert caught.value.tool == "sh"
    assert caught.value.returncode == 2
    assert SECRET_FILE_VALUE.decode() not in repr(caught.value)


def test_a_missing_tool_is_one_tool_error(executor: Executor) -> None:
    with pytest.raises(ToolError, match="trustplane-no-such-tool not found"):
        executor.run(["trustplane-no-such-tool"])


def test_unchecked_call_returns_the_exit_status(executor: Executor) -> None:
    result = executor.run(["sh", "-c", "echo out; exit 4"], check=False)
    assert (result.returncode, result.text) == (4, "out\n")


def test_known_failure_maps_to_its_error_class(executor: Executor, tmp_path: Path) -> None:
    """A wrong LUKS key is a key error (exit 6 at the CLI), not a broken tool."""
    volume = tmp_path / "volume.img"
    volume.write_bytes(b"\0" * (32 << 20))
    key = os.urandom(32).hex().encode()
    luks = ["--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    executor.run(
        ["cryptsetup", "luksFormat", *luks, "--batch-mode", str(volume), "--key-file", "-"],
        stdin=key,
    )
    wrong_key = {"No key available with this passphrase": DecryptionKeyError}
    test = ["cryptsetup", "open", "--test-passphrase", str(volume), "--key-file"]
    executor.run([*test, SecretFd(key)], failures=wrong_key)
    with pytest.raises(
        DecryptionKeyError, match=r"^cryptsetup failed .*No key available"
    ) as caught:
        executor.run([*test, SecretFd(os.urandom(32).hex().encode())], failures=wrong_key)
    assert isinstance(caught.value.__cause__, ToolError)
    assert key not in volume.read_bytes()


def _flaky_tool(counter: Path, fail_times: int, message: str) -> list[str]:
    """A real program that fails with `message` its first `fail_times` runs."""
    script = (
        'n=$(cat "$1" 2>/dev/null || echo 0); echo $((n + 1)) > "$1";'
        f' if [ "$n" -lt {fail_times} ]; then echo "tool: {message}" >&2; exit 1; fi; echo done'
    )
    return ["sh", "-c", script, "sh", str(counter)]


def test_retry_on_the_known_message_with_cleanup_between_tries(
    executor: Executor, tmp_path: Path
) -> None:
    counter = tmp_path / "runs"
    cleanups: list[int] = []
    retry = QEMU_PBKDF_CALIBRATION.with_cleanup(lambda: cleanups.append(int(counter.read_text())))
    result = executor.run(
        _flaky_tool(counter, 3, "Unable to get accurate CPU usage"),
        retry=retry,
    )
    assert result.text == "done\n"
    assert result.tries == 4
    assert counter.read_text() == "4\n"
    assert cleanups == [1, 2, 3], "cleanup runs after each failed try, before the next"


def test_retry_gives_up_after_its_tries(executor: Executor, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    with pytest.raises(ToolError, match=r"\(try 3 of 3\): tool: transient"):
        executor.run(_flaky_tool(counter, 10, "transient"), retry=Retry(("transient",), tries=3))
    assert counter.read_text() == "3\n"


def test_other_failures_are_not_retried(executor: Executor, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    retry = QEMU_PBKDF_CALIBRATION.with_cleanup(lambda: pytest.fail("no cleanup expected"))
    with pytest.raises(ToolError, match="Invalid password"):
        executor.run(_flaky_tool(counter, 10, "Invalid password"), retry=retry)
    assert counter.read_text() == "1\n"


def test_timeouts_are_not_retried(executor: Executor, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    argv = ["sh", "-c", 'echo x >> "$1"; sleep 60', "sh", str(counter)]
    with pytest.raises(ToolTimeout):
        executor.run(argv, timeout=0.3, retry=Retry(("x",), tries=5))
    assert counter.read_text() == "x\n"


def test_timeout_kills_the_whole_process_group(executor: Executor, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = 'sleep 300 & sleep 300 & touch "$1"; echo "waiting for my children" >&2; wait'
    call = _InThread(lambda: executor.run(["sh", "-c", script, "sh", str(ready)], timeout=2))
    leader = call.child()
    _wait_for(ready)
    group = _session_pids(leader)
    assert len(group) == 3, "sh and its two sleeps"
    call.join()
    assert isinstance(call.error, ToolTimeout)
    assert str(call.error) == (
        "sh did not finish within 2 s and was killed: waiting for my children"
    )
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in group) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(pid) for pid in group)


def test_qemu_img_luks_create_with_the_calibration_retry(
    executor: Executor, tmp_path: Path, secret_root: Path
) -> None:
    """The first real user of the retry: every create succeeds and opens with its key."""
    for index in range(2):
        key = os.urandom(32).hex().encode()  # QEMU wants a UTF-8 passphrase
        image = tmp_path / f"v{index}.luks"
        created = executor.run(
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
                "4M",
            ],
            retry=QEMU_PBKDF_CALIBRATION,
        )
        assert 1 <= created.tries <= QEMU_PBKDF_CALIBRATION.tries
        opened = executor.run(
            [
                "qemu-io",
                "--object",
                SecretFile(key, "secret,id=s0,file={}"),
                "--image-opts",
                f"driver=luks,key-secret=s0,file.filename={image}",
                "-c",
                "write -P 0x5a 0 64k",
                "-c",
                "read -P 0x5a 0 64k",
            ]
        )
        assert b"read 65536/65536 bytes" in opened.stdout
        assert image.read_bytes().startswith(b"LUKS\xba\xbe")
        assert key not in image.read_bytes()
    assert list(secret_root.iterdir()) == []


def test_secret_placeholders_take_bytes_and_one_slot() -> None:
    with pytest.raises(TypeError):
        SecretFile("a str is not a secret")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly once"):
        SecretFd(b"k", "no slot")
    with pytest.raises(ValueError, match="exactly once"):
        SecretFile(b"k", "{}{}")


def test_secret_repr_does_not_show_the_value() -> None:
    assert b"hidden".decode() not in repr(SecretFile(b"hidden"))
    assert b"hidden".decode() not in repr(SecretFd(b"hidden"))


def test_a_dead_process_leftovers_are_swept(tmp_path: Path) -> None:
    """A process killed mid-call leaves its directory; the next call removes it."""
    root = tmp_path / "root"
    root.mkdir()
    dead_pid = _a_dead_pid()
    stale = root / f"{PREFIX}{dead_pid}-abc"
    stale.mkdir(mode=0o700)
    (stale / "s0").write_bytes(b"left behind")
    alive = root / f"{PREFIX}{os.getpid()}-def"
    alive.mkdir(mode=0o700)
    with SecretDir(root) as fresh:
        assert fresh.path.exists()
    assert not stale.exists()
    assert alive.exists(), "a live process's directory is not touched"


def _a_dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_errors_are_trustplane_errors() -> None:
    assert issubclass(ToolError, TrustplaneError)
    assert issubclass(ToolTimeout, ToolError)


@pytest.fixture(autouse=True)
def _no_secret_dirs_left(secret_root: Path) -> Iterator[None]:
    yield
    assert _private_dirs(secret_root) == []
