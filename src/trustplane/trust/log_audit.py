"""Audit a transparency log as a monitor does (RFC 9162 section 8.3): fetch
every entry, recompute the tree and compare its root with the signed
checkpoint; and where they differ, name the first entry that does not fit.

A stored leaf that was altered (or removed, or slipped in) changes the
recomputed root, while the log's stored tree, and so its checkpoints and
proofs, stay as they were: a client that checks only checkpoints and chosen
inclusions never sees it. To find the entry, the audit keeps the rebuilt
tree's head every `STRIDE` leaves and bisects with consistency proofs
against the signed root: the prefix of size k fits iff a proof shows the
signed tree extends the recomputed tree of k leaves, which holds for every
k up to the first bad entry and for no k after it. About 2 log2(n)
proofs, one re-read of at most `STRIDE` entries; memory stays flat.

No I/O: the caller hands in how to fetch entries and proofs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from trustplane.trust.merkle import (
    TreeState,
    fold,
    fold_leaves,
    leaf_hashes,
    root,
    verify_consistency,
)

STRIDE = 1 << 16
"""Leaves between two kept heads of the rebuilt tree (the bisection's last step)."""
PAGE = 1 << 18
"""Entries asked for in one request."""

Entries = Callable[[int, int], Iterable[Sequence[bytes]]]
"""(start, end) -> the bodies of entries [start, end), in order, in batches."""
Proof = Callable[[int, int], list[bytes]]
"""(old size, new size) -> the log's consistency proof."""
Progress = Callable[[int], object]


@dataclass(frozen=True)
class Finding:
    index: int | None
    """The first entry that does not fit (None: the whole history does not)."""
    reason: str


@dataclass(frozen=True)
class Audit:
    size: int
    root: bytes
    """The root recomputed from the entries."""
    finding: Finding | None


class _Rebuild:
    """The tree, rebuilt from the entries, with its head kept every STRIDE
    leaves and at the sizes in `marks`."""

    def __init__(self, marks: Iterable[int]) -> None:
        self.state = TreeState()
        self.kept: dict[int, TreeState] = {0: self.state}
        self.marks = sorted(set(marks))

    def add(self, bodies: Sequence[bytes]) -> None:
        position = 0
        while position < len(bodies):
            size = self.state.size
            boundary = (size // STRIDE + 1) * STRIDE
            for mark in self.marks:
                if mark > size:
                    boundary = min(boundary, mark)
                    break
            take = min(len(bodies) - position, boundary - size)
            if position == 0 and take == len(bodies):
                self.state = fold_leaves(self.state, bodies)
            else:
                self.state = fold_leaves(self.state, bodies[position : position + take])
            position += take
            if self.state.size == boundary:
                self.kept[boundary] = self.state


def audit(
    size: int,
    signed_root: bytes,
    entries: Entries,
    proof: Proof,
    known: tuple[int, bytes] | None = None,
    progress: Progress | None = None,
) -> Audit:
    """Recompute the tree of the first `size` entries and hold it to the
    signed `signed_root`, and to `known` (size, root) verified before."""
    rebuild = _Rebuild([known[0]] if known else [])
    done = 0
    for start in range(0, size, PAGE):
        end = min(size, start + PAGE)
        for batch in entries(start, end):
            if done + len(batch) > end:
                return Audit(size, b"", Finding(end, f"the log sent more entries than {end}"))
            rebuild.add(batch)
            done += len(batch)
            if progress is not None:
                progress(done)
        if done != end:
            return Audit(
                size, b"", Finding(done, f"entry {done} is missing: the log's answer ended there")
            )
    rebuild.kept[size] = rebuild.state
    recomputed = root(rebuild.state)
    if recomputed != signed_root:
        index = _first_misfit(size, signed_root, rebuild.kept, entries, proof)
        return Audit(
            size,
            recomputed,
            Finding(
                index,
                f"entry {index} does not fit the signed checkpoint of {size} entries: the "
                "stored entry is not the one the tree was built with (altered, removed or "
                "inserted)",
            ),
        )
    if known is not None and known[0] > 0 and root(rebuild.kept[known[0]]) != known[1]:
        return Audit(
            size,
            recomputed,
            Finding(
                None,
                f"the first {known[0]} entries do not hash to the checkpoint verified before: "
                "the log's history was rewritten",
            ),
        )
    return Audit(size, recomputed, None)


def _first_misfit(
    size: int,
    signed_root: bytes,
    kept: dict[int, TreeState],
    entries: Entries,
    proof: Proof,
) -> int:
    def fits(k: int, state: TreeState) -> bool:
        if k == 0:
            return True
        if k == size:
            return root(state) == signed_root
        return verify_consistency(k, size, root(state), signed_root, proof(k, size))

    sizes = sorted(kept)
    low, high = 0, len(sizes) - 1  # fits(sizes[low]), not fits(sizes[high])
    while high - low > 1:
        middle = (low + high) // 2
        if fits(sizes[middle], kept[sizes[middle]]):
            low = middle
        else:
            high = middle
    base, top = sizes[low], sizes[high]
    hashes: list[bytes] = []
    for batch in entries(base, top):
        hashes.extend(leaf_hashes(batch))
    start = kept[base]
    low_k, high_k = base, top
    while high_k - low_k > 1:
        middle = (low_k + high_k) // 2
        if fits(middle, fold(start, hashes[: middle - base])):
            low_k = middle
        else:
            high_k = middle
    return high_k - 1
