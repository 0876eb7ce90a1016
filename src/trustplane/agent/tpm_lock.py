"""One TPM, several processes of one node: they take turns under a file lock.

swtpm's socket TCTI serves one client at a time, and a TPM without a
resource manager holds only three objects. So every process of a node that
talks to the TPM (the agent's attestation rounds, `trustplane run`) opens it
only while it holds an exclusive `flock` on STATE_DIR/tpm.lock, and closes
it before letting go. The same lock keeps the event log (in the state
directory) and the PCR in step: one writer extends and logs at a time.

Hold it for a few TPM operations, never for a download: the other
processes wait for it (up to `timeout` seconds, then UnavailableError).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trustplane.agent.tpm import Tpm
from trustplane.errors import UnavailableError

LOCK_FILE = "tpm.lock"
DEFAULT_TIMEOUT = 120.0


@contextmanager
def node_tpm(tcti: str, state_dir: Path, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Tpm]:
    """The node's TPM, open and ours alone until the block ends."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UnavailableError(
                        f"the TPM is busy: another process has held {path} for {timeout:g} s"
                    ) from None
                time.sleep(0.02)
        with Tpm(tcti) as tpm:
            yield tpm
    finally:
        os.close(fd)  # closing the descriptor releases the lock
