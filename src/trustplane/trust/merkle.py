"""RFC 9162 (Certificate Transparency v2) Merkle trees, section 2.1.

Three parts:

* the hashes (`leaf_hash`, `node_hash`, `EMPTY_ROOT`) and the tree head of a
  list of leaves by the RFC's own recursive definition (`root_of`);
* the client-side verifiers of inclusion and consistency proofs, written
  step by step after RFC 9162 sections 2.1.3.2 and 2.1.4.2;
* a persistent, append-only tree for the log server. Its durable state is a
  small head (`TreeState`: size and frontier) plus immutable nodes, each the
  hash of a *complete* subtree, addressed by (level, index): node (l, i)
  covers leaves [i * 2**l, (i + 1) * 2**l). A node never changes once its
  subtree is complete, so proofs for any historical size up to the current
  one read only such nodes; the hash of a subtree that is incomplete at the
  requested size is folded from its complete parts. Every proof reads its
  nodes with one `NodeStore.get_nodes` call.

No library is used: the Python packages for RFC 6962 trees build proofs from
a whole in-memory tree, which does not fit a database-backed log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from trustplane.errors import MalformedError, NotFoundError, UsageError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeKey = tuple[int, int]
"""(level, index) of the complete subtree of 2**level leaves at leaf index * 2**level."""

Node = tuple[int, int, bytes]
"""(level, index, hash) of one complete subtree, as `append` hands it to the store."""

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the 0x00 prefix keeps leaves and nodes apart (second preimages)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) by the RFC's recursive definition; for tests and small trees.

    Kept independent of the frontier code below on purpose, so each checks
    the other.
    """

    def mth(begin: int, end: int) -> bytes:
        n = end - begin
        if n == 1:
            return leaf_hashes[begin]
        k = 1 << ((n - 1).bit_length() - 1)  # largest power of two < n
        return node_hash(mth(begin, begin + k), mth(begin + k, end))

    if not leaf_hashes:
        return EMPTY_ROOT
    return mth(0, len(leaf_hashes))


# --- verification (client side) -------------------------------------------------------


def _all_hashes(values: Iterable[bytes]) -> bool:
    return all(isinstance(v, bytes) and len(v) == HASH_SIZE for v in values)


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True if `proof` shows leaf `index` of the tree of `size` leaves hashing to `root`.

    RFC 9162 section 2.1.3.2, step by step. Any malformed input (index out of
    range, hashes of the wrong length, a proof one element too long or short)
    is a plain False.
    """
    if not _all_hashes([leaf_hash, root, *proof]):
        return False
    if index < 0 or index >= size:  # step 1
        return False
    fn, sn = index, size - 1  # step 2
    r = leaf_hash  # step 3
    for p in proof:  # step 4
        if sn == 0:  # 4a
            return False
        if fn & 1 or fn == sn:  # 4b
            r = node_hash(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # 4c
        sn >>= 1
    return sn == 0 and r == root  # step 5


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True if `proof` shows the tree (`new_size`, `new_root`) extends (`old_size`, `old_root`).

    RFC 9162 section 2.1.4.2 for 0 < old_size < new_size. The RFC leaves the
    other cases to the caller; here equal sizes need an empty proof and equal
    roots, and an empty old tree needs an empty proof and `old_root` equal to
    `EMPTY_ROOT` (stricter than transparency-dev/merkle, which accepts any old
    root for size 0: a checkpoint of size 0 can only carry that root).
    """
    if not _all_hashes([old_root, new_root, *proof]):
        return False
    if old_size < 0 or old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root and (old_size > 0 or old_root == EMPTY_ROOT)
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:  # step 1
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # step 2: old_size is a power of two
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1  # step 3
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:  # 6a
            return False
        if fn & 1 or fn == sn:  # 6b
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1  # 6c
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0  # step 7


# --- the persistent tree (server side) -------------------------------------------------


class NodeStore(Protocol):
    """Where the complete-subtree hashes live (a database table, in the control plane)."""

    def get_nodes(self, keys: Sequence[NodeKey]) -> Mapping[NodeKey, bytes]:
        """The stored hashes of `keys`; a key with no node is left out of the answer."""
        ...


@dataclass(frozen=True, slots=True)
class TreeState:
    """The log head: its size and the frontier, what `append` needs and nothing more.

    The frontier holds the hashes of the complete subtrees along the right
    edge of the tree, one per set bit of `size`, largest (leftmost) first: for
    size 6 = 0b110 the subtrees of leaves [0, 4) and [4, 6). It is at most 64
    hashes, so the head fits one database row.
    """

    size: int = 0
    frontier: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 64:
            raise MalformedError("tree size out of range")
        if len(self.frontier) != self.size.bit_count() or not _all_hashes(self.frontier):
            raise MalformedError("tree frontier does not match the tree size")

    def to_bytes(self) -> bytes:
        """8-byte big-endian size, then the frontier hashes, largest subtree first."""
        return self.size.to_bytes(8, "big") + b"".join(self.frontier)

    @classmethod
    def from_bytes(cls, data: bytes) -> TreeState:
        """Inverse of `to_bytes`; `MalformedError` if the lengths do not agree."""
        if len(data) < 8 or (len(data) - 8) % HASH_SIZE:
            raise MalformedError("tree state has a wrong length")
        size = int.from_bytes(data[:8], "big")
        frontier = tuple(data[i : i + HASH_SIZE] for i in range(8, len(data), HASH_SIZE))
        return cls(size, frontier)


def append(state: TreeState, leaf_hashes: Sequence[bytes]) -> tuple[TreeState, list[Node]]:
    """Add leaves; return the new head and every node completed by them, leaves included.

    The store inserts the returned nodes (they never change afterwards) and
    the head in one transaction. No store reads; O(k + log n) hashes for k
    leaves, about one node hash per leaf on average.
    """
    if not _all_hashes(leaf_hashes):
        raise ValueError("leaf hashes are 32 bytes")
    stack = list(state.frontier)
    size = state.size
    nodes: list[Node] = []
    for h in leaf_hashes:
        nodes.append((0, size, h))
        n, level = size, 0
        while n & 1:  # each trailing one of the old size closes a subtree
            h = node_hash(stack.pop(), h)
            n >>= 1
            level += 1
            nodes.append((level, n, h))
        stack.append(h)
        size += 1
    return TreeState(size, tuple(stack)), nodes


def fold(state: TreeState, leaf_hashes: Iterable[bytes]) -> TreeState:
    """`append` without the nodes: only the new head, for recomputing a whole
    tree from its leaves (an audit) at the speed of the hashing."""
    stack = list(state.frontier)
    size = state.size
    sha256, pop, push = _sha256, stack.pop, stack.append
    for h in leaf_hashes:
        n = size
        while n & 1:
            h = sha256(b"\x01" + pop() + h).digest()
            n >>= 1
        push(h)
        size += 1
    return TreeState(size, tuple(stack))


def fold_leaves(state: TreeState, bodies: Iterable[bytes]) -> TreeState:
    """`fold` of the leaf hashes of `bodies`, in one pass: an audit's inner
    loop, where a list of leaf hashes in between costs a sixth of the time."""
    stack = list(state.frontier)
    size = state.size
    sha256, pop, push = _sha256, stack.pop, stack.append
    for body in bodies:
        h = sha256(b"\x00" + body).digest()
        n = size
        while n & 1:
            h = sha256(b"\x01" + pop() + h).digest()
            n >>= 1
        push(h)
        size += 1
    return TreeState(size, tuple(stack))


def leaf_hashes(bodies: Iterable[bytes]) -> list[bytes]:
    """`leaf_hash` of each body."""
    sha256 = _sha256
    return [sha256(b"\x00" + body).digest() for body in bodies]


def root(state: TreeState) -> bytes:
    """The tree head MTH, folded from the frontier (smallest subtree first)."""
    if not state.frontier:
        return EMPTY_ROOT
    r = state.frontier[-1]
    for h in reversed(state.frontier[:-1]):
        r = node_hash(h, r)
    return r


def _range_keys(begin: int, end: int) -> list[NodeKey]:
    """Complete subtrees covering leaves [begin, end), largest first.

    `begin` must be a multiple of the largest power of two <= end - begin
    (true for 0 and for every right sibling on a proof path), so the range is
    itself an RFC tree and its hash is the right fold of these subtrees.
    """
    keys: list[NodeKey] = []
    remaining = end - begin
    while remaining:
        level = remaining.bit_length() - 1
        keys.append((level, begin >> level))
        begin += 1 << level
        remaining -= 1 << level
    return keys


def _path(index: int, level: int, size: int) -> list[list[NodeKey]]:
    """The inclusion path of node (level, index) in the tree of `size` leaves.

    One entry per proof hash, leaf side first; an entry with several keys is
    a subtree incomplete at `size`, whose hash folds those complete parts.
    Below the level where the paths of this node and of the last leaf split,
    every sibling is complete; at that level the right sibling holds the last
    leaf and may be incomplete; above it only left siblings exist.
    """
    last = (size - 1) >> level
    split = (index ^ last).bit_length()
    path: list[list[NodeKey]] = [[(level + d, (index >> d) ^ 1)] for d in range(split - 1)]
    if split:
        sibling_level = level + split - 1
        begin = ((index >> (split - 1)) ^ 1) << sibling_level
        path.append(_range_keys(begin, size))
    node, node_level = index >> split, level + split
    while node:
        if node & 1:
            path.append([(node_level, node ^ 1)])
        node >>= 1
        node_level += 1
    return path


def _resolve(store: NodeStore, entries: list[list[NodeKey]]) -> list[bytes]:
    """Read every key of `entries` in one store call and fold each entry to one hash."""
    keys = sorted({key for entry in entries for key in entry})
    if not keys:
        return []
    found = store.get_nodes(keys)
    missing = [key for key in keys if key not in found]
    if missing:
        level, index = missing[0]
        raise NotFoundError(
            f"the log has no tree node ({level}, {index}): the requested size is past its end"
        )
    hashes: list[bytes] = []
    for entry in entries:
        h = found[entry[-1]]
        for key in reversed(entry[:-1]):
            h = node_hash(found[key], h)
        hashes.append(h)
    return hashes


def inclusion_proof(store: NodeStore, index: int, size: int) -> list[bytes]:
    """PATH(index, D[size]) of RFC 9162 section 2.1.3.1, for any size the store has reached."""
    if not 0 <= index < size:
        raise UsageError(f"leaf index {index} is not in a tree of size {size}")
    return _resolve(store, _path(index, 0, size))


def consistency_proof(store: NodeStore, old_size: int, new_size: int) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 9162 section 2.1.4.1; empty for 0 or equal sizes.

    The proof is the inclusion path, in the new tree, of the largest complete
    subtree that ends at old_size, preceded by that subtree's hash unless it
    is the whole old tree (old_size a power of two: the client has that root).
    """
    if not 0 <= old_size <= new_size:
        raise UsageError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []
    level = (old_size & -old_size).bit_length() - 1
    index = (old_size - 1) >> level
    entries = _path(index, level, new_size)
    if index:
        entries.insert(0, [(level, index)])
    return _resolve(store, entries)


def state_at(store: NodeStore, size: int) -> TreeState:
    """The head as it was at `size`, rebuilt from the store (checks, recovery, old roots)."""
    if size < 0:
        raise UsageError("tree size must be non-negative")
    keys = _range_keys(0, size)
    return TreeState(size, tuple(_resolve(store, [[key] for key in keys])))


class MemoryNodeStore:
    """A `NodeStore` in a dict: tests, benchmarks and throw-away logs."""

    def __init__(self) -> None:
        self.nodes: dict[NodeKey, bytes] = {}

    def put_nodes(self, nodes: Iterable[Node]) -> None:
        """Insert what `append` returned."""
        for level, index, h in nodes:
            self.nodes[(level, index)] = h

    def get_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """The stored hashes of `keys` that exist."""
        nodes = self.nodes
        return {key: nodes[key] for key in keys if key in nodes}
