"""The unwrap cache: bounded, expiring, keyed by everything an unwrap checks."""

from __future__ import annotations

import time

from trustplane.keys.key_cache import UnwrapCache


def test_hit_only_for_the_same_kek_blob_and_aad() -> None:
    cache = UnwrapCache(ttl=60)
    cache.put("k1", b"blob", b"aad", b"key")
    assert cache.get("k1", b"blob", b"aad") == b"key"
    assert cache.get("k1", b"blob", b"other") is None
    assert cache.get("k2", b"blob", b"aad") is None
    assert cache.get("k1", b"blob2", b"aad") is None
    # Length-prefixed parts: moving bytes between fields is another slot.
    assert cache.get("k1", b"blo", b"baad") is None


def test_expiry() -> None:
    cache = UnwrapCache(ttl=0.05)
    cache.put("k", b"b", b"a", b"key")
    time.sleep(0.1)
    assert cache.get("k", b"b", b"a") is None
    assert len(cache) == 0


def test_least_recently_used_goes_first() -> None:
    cache = UnwrapCache(ttl=60, max_entries=2)
    cache.put("k", b"1", b"", b"one")
    cache.put("k", b"2", b"", b"two")
    assert cache.get("k", b"1", b"") == b"one"
    cache.put("k", b"3", b"", b"three")
    assert cache.get("k", b"2", b"") is None
    assert cache.get("k", b"1", b"") == b"one"
    assert len(cache) == 2


def test_forget_kek_and_clear() -> None:
    cache = UnwrapCache(ttl=60)
    cache.put("old", b"1", b"", b"x")
    cache.put("new", b"2", b"", b"y")
    cache.forget_kek("old")
    assert cache.get("old", b"1", b"") is None
    assert cache.get("new", b"2", b"") == b"y"
    cache.clear()
    assert len(cache) == 0


def test_disabled() -> None:
    for cache in (UnwrapCache(ttl=0), UnwrapCache(ttl=60, max_entries=0)):
        cache.put("k", b"b", b"a", b"key")
        assert not cache.enabled
        assert cache.get("k", b"b", b"a") is None
