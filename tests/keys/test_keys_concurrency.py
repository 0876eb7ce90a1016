"""Many threads wrap and unwrap through one provider while it rotates."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kmip_helpers import KmipFactory

from trustplane.keys.kek import KekProvider
from trustplane.keys.kek_file import FileKekProvider

THREADS = 16


def hammer(provider: KekProvider, per_thread: int, *, rotations: int = 0) -> float:
    """Each thread wraps and unwraps its own keys; one more thread rotates meanwhile.

    Returns the elapsed seconds; fails the test on any wrong key or exception.
    """
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS + 1)

    def worker(n: int) -> None:
        try:
            start.wait()
            wrapped = []
            for i in range(per_thread):
                key, aad = os.urandom(32), f"secret/{n}/{i}".encode()
                wrapped.append((key, aad, provider.wrap(key, aad)))
            for key, aad, blob in wrapped:
                assert provider.unwrap(blob, aad) == key
        except BaseException as exc:
            errors.append(exc)

    def rotator() -> None:
        try:
            start.wait()
            for _ in range(rotations):
                provider.rotate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    threads.append(threading.Thread(target=rotator))
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    assert not errors, errors[:3]
    return elapsed


def rate(operation: Callable[[], object], count: int) -> float:
    began = time.perf_counter()
    for _ in range(count):
        operation()
    return count / (time.perf_counter() - began)


def test_file_provider_under_threads(tmp_path: Path) -> None:
    provider = FileKekProvider(tmp_path / "kek.json")
    hammer(provider, 200, rotations=5)
    assert len(provider.known_ids()) == 6
    wrapped = provider.wrap(os.urandom(32), b"aad")
    wraps = rate(lambda: provider.wrap(b"k" * 32, b"aad"), 2000)
    unwraps = rate(lambda: provider.unwrap(wrapped, b"aad"), 2000)
    print(f"\nfile provider: {wraps:,.0f} wraps/s, {unwraps:,.0f} unwraps/s (one thread)")
    assert wraps > 1000
    assert unwraps > 1000


@pytest.mark.integration
def test_kmip_provider_under_threads(kmip_factory: KmipFactory) -> None:
    provider = kmip_factory(cache_ttl=0)
    elapsed = hammer(provider, 15, rotations=2)
    operations = THREADS * 15 * 2
    print(f"\nkmip provider: {operations / elapsed:,.0f} wrap+unwrap/s with {THREADS} threads")
    assert len(provider.known_ids()) == 3


@pytest.mark.integration
def test_kmip_cached_unwraps_are_fast(kmip_factory: KmipFactory) -> None:
    provider = kmip_factory(cache_ttl=60)
    wrapped = provider.wrap(os.urandom(32), b"aad")
    provider.unwrap(wrapped, b"aad")
    unwraps = rate(lambda: provider.unwrap(wrapped, b"aad"), 2000)
    print(f"\nkmip provider: {unwraps:,.0f} cached unwraps/s (one thread)")
    assert unwraps > 1000
