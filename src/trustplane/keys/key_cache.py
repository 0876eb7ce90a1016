"""A bounded, expiring memory of recently unwrapped keys.

Unwrapping under a remote KEK costs a network round trip (about 2-5 ms with
PyKMIP); reading the same secret again within a few minutes should not. The
cache is keyed by a hash of (KEK id, wrapped blob, associated data), so a
lookup with other associated data misses and goes to the KEK store, which
refuses it: the cache can only ever return what an unwrap already proved.
Entries expire after `ttl` seconds, and `forget_kek` drops every entry of a
retired KEK at once, so retirement fails closed immediately in this process.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

DEFAULT_TTL = 300.0
DEFAULT_MAX_ENTRIES = 10_000


class UnwrapCache:
    """LRU of unwrapped keys with a time-to-live; thread-safe. `ttl <= 0` disables it."""

    def __init__(self, *, ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[float, str, bytes]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.max_entries > 0

    def get(self, kek_id: str, blob: bytes, aad: bytes) -> bytes | None:
        if not self.enabled:
            return None
        slot = _slot(kek_id, blob, aad)
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(slot)
            if entry is None:
                return None
            expires, _, key = entry
            if expires <= now:
                del self._entries[slot]
                return None
            self._entries.move_to_end(slot)
            return key

    def put(self, kek_id: str, blob: bytes, aad: bytes, key: bytes) -> None:
        if not self.enabled:
            return
        slot = _slot(kek_id, blob, aad)
        expires = time.monotonic() + self.ttl
        with self._lock:
            self._entries[slot] = (expires, kek_id, key)
            self._entries.move_to_end(slot)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget_kek(self, kek_id: str) -> None:
        with self._lock:
            for slot in [s for s, (_, k, _) in self._entries.items() if k == kek_id]:
                del self._entries[slot]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _slot(kek_id: str, blob: bytes, aad: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in (kek_id.encode("utf-8"), blob, aad):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()
