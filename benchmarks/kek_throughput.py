"""Wraps and unwraps per second for the file and KMIP KEK providers.

The KMIP provider talks to a real PyKMIP server this script starts on
127.0.0.1 (mutual TLS, SQLite), so its figures are PyKMIP's: it serializes
every request under one lock and looks each key up in SQLite, which bounds
what any client gets from it. Unwraps are measured with the cache off
(every call is a Decrypt) and on (a repeated secret).

    python benchmarks/kek_throughput.py [--seconds 3] [--threads 1,8] [--pool 1,4]

Prints one line per provider, operation and thread count.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from trustplane.embedded.kmip import start_kmip_server
from trustplane.keys.kek import KekProvider
from trustplane.keys.kek_file import FileKekProvider
from trustplane.keys.kek_kmip import KmipKekProvider


def measure(operation: Callable[[int], object], threads: int, seconds: float) -> float:
    """Calls per second of `operation(i)` from `threads` threads for about `seconds`."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds
    start = threading.Barrier(threads + 1)

    def worker(n: int) -> None:
        start.wait()
        i = 0
        while time.perf_counter() < stop:
            operation(i)
            i += 1
        counts[n] = i

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    began = time.perf_counter()
    start.wait()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - began)


def report(name: str, provider: KekProvider, threads: list[int], seconds: float) -> None:
    wrapped = [provider.wrap(os.urandom(32), f"s{i}".encode()) for i in range(64)]
    for count in threads:
        wraps = measure(lambda i: provider.wrap(b"k" * 32, b"aad"), count, seconds)
        unwraps = measure(
            lambda i: provider.unwrap(wrapped[i % 64], f"s{i % 64}".encode()), count, seconds
        )
        print(f"{name:28} threads={count:<3} wraps/s={wraps:>10,.0f}  unwraps/s={unwraps:>10,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--pool", default="1,4")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="kek-bench-") as tmp:
        work = Path(tmp)
        with FileKekProvider(work / "kek.json") as provider:
            report("file", provider, threads, args.seconds)
        server = start_kmip_server(work / "kmip")
        try:
            for pool in (int(p) for p in args.pool.split(",")):
                for cache_ttl, label in ((0.0, "uncached"), (300.0, "cached")):
                    provider = KmipKekProvider(
                        server.host,
                        server.port,
                        ca_file=server.ca_file,
                        cert_file=server.client_cert,
                        key_file=server.client_key,
                        pool_size=pool,
                        cache_ttl=cache_ttl,
                    )
                    with provider:
                        report(f"kmip pool={pool} {label}", provider, threads, args.seconds)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
