"""Who owns what, so that a store restarted after a crash knows what to undo.

A lease is a directory holding an `owner` file locked (flock) by the process
that does the work, and a `state.json` it rewrites atomically as it takes
resources (a daemon's pid, a loop device, mount points, layers being made).
The kernel drops the lock when the owner dies, however it dies (`kill -9`
included): a lease whose lock can be taken belongs to nobody, and whoever
takes it undoes what its state lists. The lock file is opened close-on-exec,
so a daemon the owner started does not keep the lease alive after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from trustplane.atomic import atomic_write

_OWNER = "owner"
_STATE = "state.json"


class Lease:
    """A held lease: its directory, its state, the lock that proves its owner lives."""

    def __init__(self, path: Path, handle: int, state: dict[str, Any]) -> None:
        self.path = path
        self._handle: int | None = handle
        self.state = state

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def take(cls, parent: Path, state: dict[str, Any], name: str | None = None) -> Lease:
        """A new lease under `parent`, held until `release` (or the owner's death)."""
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = parent / (name or uuid.uuid4().hex)
        # Made under a hidden name, locked and described, then renamed into
        # view: nobody may find a lease before its owner holds it.
        hidden = parent / f".{final.name}"
        hidden.mkdir(mode=0o700)
        try:
            handle = os.open(hidden / _OWNER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(handle, fcntl.LOCK_EX)
            lease = cls(hidden, handle, dict(state))
            lease.save()
            hidden.rename(final)
        except BaseException:
            shutil.rmtree(hidden, ignore_errors=True)
            raise
        lease.path = final
        return lease

    def save(self) -> None:
        """Write the state atomically (before taking the resource it names)."""
        atomic_write(self.path / _STATE, json.dumps(self.state).encode(), mode=0o600)

    def update(self, **changes: Any) -> None:
        self.state.update(changes)
        self.save()

    def release(self) -> None:
        """The work is done or undone: remove the lease. Idempotent."""
        if self._handle is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._handle)
        self._handle = None

    def abandon(self) -> None:
        """Stop holding the lease but keep it: what its state lists is left for recovery."""
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def live_states(parent: Path) -> Iterator[dict[str, Any]]:
    """The state of every lease under `parent` whose owner is alive."""
    for path in _leases(parent):
        with _try_lock(path) as handle:
            if handle is None:
                yield _read_state(path)


def orphans(parent: Path) -> Iterator[Lease]:
    """Leases whose owner died, each now held by us: undo its state, then `release()`."""
    for path in _leases(parent):
        handle = _lock_nowait(path)
        if handle is None:
            continue
        yield Lease(path, handle, _read_state(path))


def _leases(parent: Path) -> list[Path]:
    """Leases in view; a hidden one is still being made (or its maker died
    making it, holding nothing yet: `sweep_hidden` removes it)."""
    try:
        return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def sweep_hidden(parent: Path, older_than: float = 600.0) -> None:
    """Remove half-made leases left by a crash (long enough ago that nobody is making them)."""
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".") and p.is_dir()]
    except FileNotFoundError:
        return
    for path in entries:
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > older_than:
                shutil.rmtree(path, ignore_errors=True)


def _lock_nowait(path: Path) -> int | None:
    """Our own lock on the lease, or None while its owner holds it."""
    try:
        handle = os.open(path / _OWNER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None  # released (removed) meanwhile
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        return None
    if not path.exists():  # released between our open and our lock
        os.close(handle)
        return None
    return handle


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[int | None]:
    handle = _lock_nowait(path)
    try:
        yield handle
    finally:
        if handle is not None:
            os.close(handle)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / _STATE).read_bytes())
    except (OSError, ValueError):
        return {}  # died before its first save: nothing was taken yet
    return state if isinstance(state, dict) else {}
