"""The node's TPM lock: processes of one node take turns on one (real) swtpm."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from trustplane.agent.tpm_lock import LOCK_FILE, node_tpm
from trustplane.embedded.swtpm import RunningSwtpm
from trustplane.errors import UnavailableError

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process of the node, holding the lock for `seconds`."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_busy_tpm_times_out_without_being_opened(swtpm: RunningSwtpm, tmp_path: Path) -> None:
    holder = hold(tmp_path / LOCK_FILE, 30)
    try:
        started = time.monotonic()
        # A TCTI nobody serves: opening it would fail differently ("cannot open").
        with (
            pytest.raises(UnavailableError, match="the TPM is busy"),
            node_tpm("swtpm:host=127.0.0.1,port=1", tmp_path, timeout=0.3),
        ):
            pass
        assert time.monotonic() - started >= 0.3
    finally:
        holder.kill()
        holder.wait()


def test_the_next_process_gets_the_tpm_when_the_holder_lets_go(
    swtpm: RunningSwtpm, tmp_path: Path
) -> None:
    holder = hold(tmp_path / LOCK_FILE, 0.5)
    try:
        started = time.monotonic()
        with node_tpm(swtpm.tcti, tmp_path, timeout=30) as tpm:
            waited = time.monotonic() - started
            assert len(tpm.read(23)) == 32
        assert waited >= 0.3  # it waited for the holder
        # Released again: the next turn comes at once.
        with node_tpm(swtpm.tcti, tmp_path, timeout=0.1) as tpm:
            assert len(tpm.read(23)) == 32
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).stat().st_mode & 0o777 == 0o600
