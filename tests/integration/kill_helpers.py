"""`kill -9` of a server at a state the test has read, not at a moment it hoped for.

A test that polls a server's database and then sends SIGKILL leaves a window:
the server goes on between the read and the kill (a create finishes, a copy
ends). `freeze` stops the server first (SIGSTOP, every thread of it stopped,
no write to its database under way): what the test reads then is what SIGKILL
leaves, and `thaw` lets it go on when that is not the state the test wants.
Tools the server started run in sessions of their own and are neither stopped
nor killed with it: `live_children` finds them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from pathlib import Path

FREEZE_TIMEOUT = 60.0


def _stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (each one stops on its own way out of
    the kernel; one in a system call stops when the call returns)."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # that thread ended meanwhile
        if state != "T":
            return False
    return True


def _write_lock_free(database: Path) -> bool:
    """Whether no connection holds the SQLite database's write lock right now."""
    with contextlib.closing(sqlite3.connect(database, timeout=0, isolation_level=None)) as db:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # "database is locked"
            return False
        db.execute("ROLLBACK")
    return True


def freeze(pid: int, database: Path) -> None:
    """SIGSTOP `pid` at a moment it has no write to `database` under way.

    Every thread stopped is not enough: a commit stopped half-way (its WAL
    frames written, the WAL index not yet told) is not seen by a reader now,
    yet the next reader after the kill rebuilds the index from the WAL and sees
    it. With the write lock free as well, what a reader sees is what SIGKILL
    leaves; else the process goes on a moment and is stopped again."""
    deadline = time.monotonic() + FREEZE_TIMEOUT
    while True:
        os.kill(pid, signal.SIGSTOP)
        while not _stopped(pid):
            assert time.monotonic() < deadline, f"process {pid} did not stop"
            time.sleep(0.005)
        if _write_lock_free(database):
            return
        os.kill(pid, signal.SIGCONT)
        assert time.monotonic() < deadline, f"process {pid} kept {database} locked"
        time.sleep(0.001)


def thaw(pid: int) -> None:
    """Let a frozen process go on."""
    os.kill(pid, signal.SIGCONT)


def live_children(pid: int) -> list[int]:
    """The children of `pid` that still run (not zombies): tools it started and
    waits for, which a SIGSTOP of it does not stop and a SIGKILL of it does not end."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
