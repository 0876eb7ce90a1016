"""ManagedProcess starts, waits, reports and stops real child processes."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from trustplane.embedded.process import (
    ManagedProcess,
    TcpReady,
    UnixSocketReady,
    free_port,
    require_binary,
    tail_lines,
)
from trustplane.errors import UnavailableError


def _gone(pid: int, within: float = 5.0) -> bool:
    """True once `pid` no longer runs (a zombie waiting for init counts as gone)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rpartition(")")[2].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_require_binary_finds_and_explains() -> None:
    assert require_binary("sh", "dash").endswith("/sh")
    with pytest.raises(UnavailableError, match="install the Debian package no-such-pkg"):
        require_binary("trustplane-no-such-program", "no-such-pkg")


def test_waits_for_tcp_port(tmp_path: Path) -> None:
    port = free_port()
    server = (
        "import socket,time; s=socket.socket(); time.sleep(0.3); "
        f"s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(60)"
    )
    with ManagedProcess("tcp", [sys.executable, "-c", server], tmp_path, ready=TcpReady(port)):
        assert TcpReady(port)()
    assert not TcpReady(port)()


def test_waits_for_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = (
        "import socket,time; s=socket.socket(socket.AF_UNIX); "
        f"s.bind({str(path)!r}); s.listen(); time.sleep(60)"
    )
    proc = ManagedProcess(
        "unix", [sys.executable, "-c", server], tmp_path, ready=UnixSocketReady(path)
    )
    with proc:
        assert proc.running()
    assert not proc.running()


def test_early_exit_reports_last_log_lines(tmp_path: Path) -> None:
    script = "for i in $(seq 1 30); do echo line$i; done; exit 3"
    proc = ManagedProcess("boom", ["sh", "-c", script], tmp_path, ready=TcpReady(free_port()))
    with pytest.raises(UnavailableError) as info:
        proc.start()
    message = str(info.value)
    assert "boom exited with status 3" in message
    assert "line30" in message
    assert "line11" in message
    assert "line10\n" not in message  # only the last 20 lines
    assert (tmp_path / "boom.log").read_text().startswith("line1\n")


def test_readiness_timeout_stops_the_process(tmp_path: Path) -> None:
    proc = ManagedProcess("slow", ["sleep", "60"], tmp_path, ready=lambda: False, timeout=0.3)
    with pytest.raises(UnavailableError, match=r"slow not ready after 0\.3 s"):
        proc.start()
    assert proc.pid is not None
    assert _gone(proc.pid)


def test_stop_kills_the_whole_group_after_grace(tmp_path: Path) -> None:
    # Both the shell and its background child ignore SIGTERM: only SIGKILL ends them.
    script = 'trap "" TERM; sleep 300 & echo $! > child.pid; wait'
    child_pid_file = tmp_path / "child.pid"
    proc = ManagedProcess(
        "group",
        ["sh", "-c", script],
        tmp_path,
        ready=lambda: child_pid_file.exists() and child_pid_file.read_text().strip() != "",
        grace=0.5,
    )
    proc.start()
    child = int(child_pid_file.read_text())
    assert proc.pid is not None
    assert os.getpgid(child) == proc.pid
    started = time.monotonic()
    proc.stop()
    assert time.monotonic() - started >= 0.5
    assert _gone(proc.pid)
    assert _gone(child)
    proc.stop()  # idempotent


def test_tail_lines_of_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail_lines(tmp_path / "nothing.log") == ""
