"""Transparency-log tree speed: appends and proofs on a large in-memory tree.

A tree of N leaves (1M by default) is built through `append` into a
dict-backed node store; then, from that size on, batches of 1, 10 and 100
leaves are appended (new head and nodes computed, nodes inserted) and
inclusion and consistency proofs are produced for random indices and sizes,
each proof verified once outside the timed loop. The store is a dict, so
the numbers are the library's own cost: a database adds its round trip
(one `get_nodes` per proof, one insert per append batch).

    python benchmarks/transparency_log.py [--leaves 1000000] [--seconds 2]

Prints leaves/s and batches/s for appends, proofs/s for each proof kind and
verifications/s for the client-side verifiers.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from trustplane.trust.merkle import (
    MemoryNodeStore,
    TreeState,
    append,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root,
    state_at,
    verify_consistency,
    verify_inclusion,
)


def rate(body: Callable[[], object], seconds: float) -> float:
    """Calls per second of `body`, run for about `seconds`."""
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            body()
        count += 64
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    rng = random.Random(1)

    store = MemoryNodeStore()
    state = TreeState()
    start = time.perf_counter()
    chunk = 10_000
    for base in range(0, args.leaves, chunk):
        batch = [
            leaf_hash(i.to_bytes(8, "big")) for i in range(base, min(base + chunk, args.leaves))
        ]
        state, nodes = append(state, batch)
        store.put_nodes(nodes)
    built = time.perf_counter() - start
    print(f"built {state.size} leaves in {built:.1f} s ({state.size / built:,.0f} leaves/s)")

    for k in (1, 10, 100):
        batch = [leaf_hash(rng.randbytes(16)) for _ in range(k)]
        holder = [state]

        def one_batch(batch: list[bytes] = batch, holder: list[TreeState] = holder) -> None:
            new, nodes = append(holder[0], batch)
            store.put_nodes(nodes)
            holder[0] = new

        per_s = rate(one_batch, args.seconds)
        state = holder[0]
        print(f"append batch {k:>3}: {per_s:>10,.0f} batches/s {per_s * k:>12,.0f} leaves/s")

    size = state.size
    head = root(state)
    for label, body in [
        (
            "inclusion proof (current size)",
            lambda: inclusion_proof(store, rng.randrange(size), size),
        ),
        (
            "inclusion proof (historical size)",
            lambda: inclusion_proof(
                store, rng.randrange(size // 2), rng.randrange(size // 2, size)
            ),
        ),
        (
            "consistency proof (old -> current)",
            lambda: consistency_proof(store, rng.randrange(1, size), size),
        ),
    ]:
        print(f"{label:<36}: {rate(body, args.seconds):>10,.0f} proofs/s")

    index = rng.randrange(size)
    proof = inclusion_proof(store, index, size)
    leaf = store.nodes[(0, index)]
    assert verify_inclusion(leaf, index, size, proof, head)
    old = rng.randrange(1, size)
    old_root = root(state_at(store, old))
    cproof = consistency_proof(store, old, size)
    assert verify_consistency(old, size, old_root, head, cproof)
    verify_i = rate(lambda: verify_inclusion(leaf, index, size, proof, head), args.seconds)
    verify_c = rate(lambda: verify_consistency(old, size, old_root, head, cproof), args.seconds)
    print(f"{'verify inclusion':<36}: {verify_i:>10,.0f} /s ({len(proof)} hashes)")
    print(f"{'verify consistency':<36}: {verify_c:>10,.0f} /s ({len(cproof)} hashes)")


if __name__ == "__main__":
    main()
