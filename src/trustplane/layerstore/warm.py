"""What a container start through the snapshotter would otherwise wait for.

Measured here, a container's root costs ~0.1-0.3 s to open the image's
layers (a `qemu-storage-daemon` per chain, a loop device, a mount) and
~0.3-0.4 s to make its encrypted scratch volume (cryptsetup, the daemon, a
loop device, mkfs, a mount), against ~0.15 s for a whole `ctr run` on
overlayfs. So:

- `Spares` keeps scratch volumes made ahead, in the background: each has
  its own random key, held in this process only, like one made on demand;
- `SharedViews` opens an image's layers once for every container running
  on them (one read-only mount is the lower directory of all their
  overlays), and keeps the view open `idle` seconds after the last one
  goes, so that the next start finds it. The price: the plaintext of those
  layers stays mounted (for root on the node) that long after the last
  container, and a start within that time asks the control plane for no
  key. `idle = 0` closes a view with its last container.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
_RETRY = 1.0
"""Seconds before closing a busy view is tried again (a dying overlay still uses it)."""


class Spares(Generic[T]):
    """Up to `size` resources made ahead by a background thread."""

    def __init__(self, make: Callable[[], T], drop: Callable[[T], None], size: int) -> None:
        self.make = make
        self.drop = drop
        self.size = size
        self._ready: list[T] = []
        self._lock = threading.Lock()
        self._filler: threading.Thread | None = None
        self._closed = False

    def take(self) -> T:
        """A spare if one is ready (then another is made behind it), else a new one."""
        with self._lock:
            spare = self._ready.pop() if self._ready else None
        self.fill()
        return spare if spare is not None else self.make()

    def fill(self) -> None:
        with self._lock:
            if self._closed or self.size <= 0 or self._filler is not None:
                return
            self._filler = threading.Thread(target=self._fill, name="spares", daemon=True)
            self._filler.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            filler = self._filler
        if filler is not None:
            filler.join()
        with self._lock:
            ready, self._ready = self._ready, []
        for spare in ready:
            self.drop(spare)

    def _fill(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed or len(self._ready) >= self.size:
                        return
                made = self.make()
                with self._lock:
                    if not self._closed:
                        self._ready.append(made)
                        continue
                self.drop(made)
                return
        except Exception as exc:  # a start makes its own then; the next take tries again
            logger.warning("making a spare failed: %s", exc)
        finally:
            with self._lock:
                self._filler = None


@dataclass
class _Shared(Generic[T]):
    value: T
    users: int = 0
    idle_since: float | None = None


class SharedViews(Generic[T]):
    """One open view per key, shared by its users, closed `idle` seconds after the last."""

    def __init__(
        self,
        open_view: Callable[[str], T],
        close_view: Callable[[T, bool], None],
        idle: float,
    ) -> None:
        """`close_view(view, force)`: without force it may raise (still in use)."""
        self.open_view = open_view
        self.close_view = close_view
        self.idle = idle
        self._views: dict[str, _Shared[T]] = {}
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        self._retiring: list[T] = []
        self._closed = False

    def acquire(self, key: str) -> T:
        with self._lock:
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:  # one opening per key; other keys open meanwhile
            with self._lock:
                shared = self._views.get(key)
                if shared is not None:
                    shared.users += 1
                    shared.idle_since = None
                    return shared.value
            value = self.open_view(key)
            with self._lock:
                self._views[key] = _Shared(value, users=1)
            return value

    def release(self, key: str) -> None:
        with self._lock:
            shared = self._views.get(key)
            if shared is None:
                return
            shared.users -= 1
            if shared.users > 0:
                return
            shared.idle_since = time.monotonic()
        self._close_later(key, self.idle)

    def evict(self, key: str) -> None:
        """Close the view of `key` now if nobody uses it (its layers are about to go)."""
        with self._lock:
            shared = self._views.get(key)
            if shared is None or shared.users > 0:
                return
            del self._views[key]
        self.close_view(shared.value, True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            views = [shared.value for shared in self._views.values()] + self._retiring
            self._views, self._retiring = {}, []
        for value in views:
            self.close_view(value, True)

    def _close_later(self, key: str, delay: float) -> None:
        if delay <= 0:
            self._expire(key)
            return
        timer = threading.Timer(delay, self._expire, args=(key,))
        timer.daemon = True
        timer.start()

    def _expire(self, key: str) -> None:
        with self._lock:
            shared = self._views.get(key)
            if shared is None or shared.users > 0 or shared.idle_since is None:
                return
            left = shared.idle_since + self.idle - time.monotonic()
            if left <= 0:
                del self._views[key]
                self._retiring.append(shared.value)
        if left > 0:
            self._close_later(key, left)
        else:
            self._retire(shared.value)

    def _retire(self, value: T) -> None:
        """Close a view nobody holds; while a dying overlay still uses it, try again later."""
        with self._lock:
            if not any(v is value for v in self._retiring):
                return  # closed meanwhile (by close())
            self._retiring = [v for v in self._retiring if v is not value]
        try:
            self.close_view(value, False)
            return
        except Exception as exc:
            logger.info("a view is still in use (%s); closing it later", exc)
        with self._lock:
            closed = self._closed
            if not closed:
                self._retiring.append(value)
        if closed:
            self.close_view(value, True)
            return
        timer = threading.Timer(_RETRY, self._retire, args=(value,))
        timer.daemon = True
        timer.start()
