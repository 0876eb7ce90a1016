"""Transparency-log speed: appends and proofs on a large in-memory tree, and
a monitor's audit of a real server's log.

A tree of N leaves (1M by default) is built through `append` into a
dict-backed node store; then, from that size on, batches of 1, 10 and 100
leaves are appended (new head and nodes computed, nodes inserted) and
inclusion and consistency proofs are produced for random indices and sizes,
each proof verified once outside the timed loop. The store is a dict, so
the numbers are the library's own cost: a database adds its round trip
(one `get_nodes` per proof, one insert per append batch).

Then the audit (`--audit-entries`, default 1 000 000; 0 skips it): a
`trustplane server` on SQLite on 127.0.0.1 whose log is filled with that
many entries (attestation-sized JSON, appended in large batches by the
sequencer's own commit), audited by `trustplane log verify --audit` in its
own process, as a monitor runs it: every entry streamed over HTTPS and
hashed, the tree recomputed and compared with the signed checkpoint (goal:
>= 200 000 entries/s). The audit runs at a fifth of the entries and at all
of them; the CLI's peak RSS at both shows whether memory stays flat. Also
timed: the server's own check of its stored leaves at start.

    python benchmarks/transparency_log.py [--leaves 1000000] [--seconds 2]
        [--audit-entries 1000000]

Prints leaves/s and batches/s for appends, proofs/s for each proof kind,
verifications/s for the client-side verifiers, and the audit's entries/s.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from trustplane.control.db import Database
from trustplane.control.transparency import TransparencyLog, canonical
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
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
from trustplane.trust.note import NoteSigner


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
    if sys.argv[1:2] == ["--fill"]:
        fill(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--audit-entries", type=int, default=1_000_000)
    args = parser.parse_args()
    tree(args)
    if args.audit_entries:
        audit(args.audit_entries)


def tree(args: argparse.Namespace) -> None:
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


# -- the audit of a real server's log ---------------------------------------------------------

_BATCH = 20_000


def fill(data_dir: Path, start: int, end: int) -> None:
    """Append entries [start, end) to the stopped server's log, in large batches.

    Through the sequencer's own commit (`_commit`: leaves, subtree nodes and
    head in one transaction), not the HTTP API: the point is the audit, and a
    million single appends would only measure the append path again.
    """
    db = Database(f"sqlite:///{data_dir / 'trustplane.db'}")
    log = TransparencyLog(db, NoteSigner("bench", ed25519.Ed25519PrivateKey.generate()), "b", 0)
    try:
        for first in range(start, end, _BATCH):
            batch = []
            for n in range(first, min(end, first + _BATCH)):
                entry = {
                    "kind": "attestation.quote",
                    "time": "2025-01-01T00:00:00.000000+00:00",
                    "subject": f"node:bench-{n % 512}",
                    "result": "pass",
                    "reason": f"quote verified; {4 + n % 3} measurements match",
                    "measured": 4 + n % 3,
                }
                batch.append((canonical(entry), "attestation.quote"))
            log._commit(batch)  # the sequencer's own commit: see the docstring
    finally:
        log.close()
        db.close()


def self_check(data_dir: Path) -> float:
    """Seconds the server's start-up check of its stored leaves takes."""
    db = Database(f"sqlite:///{data_dir / 'trustplane.db'}")
    log = TransparencyLog(db, NoteSigner("bench", ed25519.Ed25519PrivateKey.generate()), "b", 0)
    try:
        start = time.perf_counter()
        assert log.check_stored_tree() is None
        return time.perf_counter() - start
    finally:
        log.close()
        db.close()


def run_audit(plane: RunningControlPlane, work: Path) -> tuple[float, float, float]:
    """(seconds, CLI's own entries/s, peak RSS MiB) of `trustplane log verify --audit`."""
    env = {
        **os.environ,
        "TRUSTPLANE_SESSION": str(work / "session.json"),
        "TRUSTPLANE_LOG_STATE": str(work / f"state-{time.monotonic_ns()}.json"),
    }
    command = [sys.executable, "-m", "trustplane"]
    login = [*command, "login", "--server", plane.url, "--ca", str(plane.ca_file)]
    login += ["--user", "admin", "--password-stdin"]
    subprocess.run(login, input=plane.admin_password + "\n", text=True, env=env, check=True)
    started = time.perf_counter()
    with subprocess.Popen(
        [*command, "log", "verify", "--audit"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as process:
        peak = 0
        while process.poll() is None:
            peak = max(peak, _peak_rss_kib(process.pid))
            time.sleep(0.05)
        output = process.stdout.read().decode() if process.stdout else ""
    seconds = time.perf_counter() - started
    found = re.search(r"\(([\d,]+) entries/s\)", output)
    if process.returncode != 0 or found is None:
        raise SystemExit(f"the audit failed: {output}")
    return seconds, float(found.group(1).replace(",", "")), peak / 1024


def _peak_rss_kib(pid: int) -> int:
    """VmHWM of a running process: its own peak, not one inherited with the
    fork (as wait4's ru_maxrss is, from a large parent)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def audit(entries: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tp-bench-audit-") as tmp:
        work = Path(tmp)
        first = start_control_plane(work / "server")
        password, data = first.admin_password, first.data_dir
        first.stop()
        done = 0
        for size in (entries // 5, entries):
            started = time.perf_counter()
            # In a process of its own, which returns its memory when it ends.
            subprocess.run(
                [sys.executable, __file__, "--fill", str(data), str(done), str(size)], check=True
            )
            done = size
            filled = time.perf_counter() - started
            check = self_check(data)
            plane = start_control_plane(work / "server", data_dir=data, admin_password=password)
            try:
                with plane.admin() as admin:
                    health = admin.health()
                assert health.log_size >= size
                assert health.log_error is None
                seconds, rate, peak = run_audit(plane, work)
            finally:
                plane.stop()
            total = health.log_size
            print(
                f"audit of {total:,} entries (log filled in {filled:.0f} s): "
                f"{total / seconds:,.0f} entries/s end to end ({seconds:.1f} s, CLI start "
                f"included), {rate:,.0f} entries/s in the audit itself; CLI peak RSS "
                f"{peak:.0f} MiB"
            )
            print(
                f"  server's check of its stored leaves at start: {check:.1f} s "
                f"({total / check:,.0f} entries/s)"
            )
        print("  goal >= 200,000 entries/s; flat memory: compare the two peak RSS figures")


if __name__ == "__main__":
    main()
