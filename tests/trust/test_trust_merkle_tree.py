"""The store-backed tree: proofs for every historical size, batched reads, exact RFC output."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustplane.errors import MalformedError, NotFoundError, UsageError
from trustplane.trust import merkle
from trustplane.trust.merkle import (
    EMPTY_ROOT,
    MemoryNodeStore,
    NodeKey,
    TreeState,
    append,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_of,
    state_at,
    verify_consistency,
    verify_inclusion,
)


def leaves(n: int, salt: int = 0) -> list[bytes]:
    return [leaf_hash(f"{salt}:{i}".encode()) for i in range(n)]


def largest_power_of_two_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 section 2.1.3.1, PATH(m, D[n]), transcribed."""
    n = len(d)
    if n == 1:
        return []
    k = largest_power_of_two_below(n)
    if m < k:
        return [*ref_path(m, d[:k]), root_of(d[k:])]
    return [*ref_path(m - k, d[k:]), root_of(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    """RFC 9162 section 2.1.4.1, SUBPROOF(m, D[n], b), transcribed."""
    n = len(d)
    if m == n:
        return [] if b else [root_of(d)]
    k = largest_power_of_two_below(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), root_of(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), root_of(d[:k])]


class CountingStore(MemoryNodeStore):
    """Counts round trips, as a database would feel them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.keys_read = 0

    def get_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        self.calls += 1
        self.keys_read += len(keys)
        return super().get_nodes(keys)


def build(hashes: Sequence[bytes], batches: Sequence[int] = ()) -> tuple[TreeState, CountingStore]:
    """Append `hashes` in batches of the given sizes (the rest in one batch)."""
    store = CountingStore()
    state = TreeState()
    start = 0
    for size in [*batches, len(hashes)]:
        state, nodes = append(state, hashes[start : start + size])
        store.put_nodes(nodes)
        start += size
        if start >= len(hashes):
            break
    return state, store


def test_exact_rfc_proofs_for_every_index_and_size_pair_up_to_40() -> None:
    hashes = leaves(40)
    _, store = build(hashes)
    for size in range(1, 41):
        for index in range(size):
            assert inclusion_proof(store, index, size) == ref_path(index, hashes[:size])
        for old in range(1, size + 1):
            assert consistency_proof(store, old, size) == ref_subproof(old, hashes[:size], True)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 3000))
def test_proofs_verify_and_any_flipped_byte_fails(data: st.DataObject, n: int) -> None:
    hashes = leaves(n, salt=n)
    batches = data.draw(st.lists(st.integers(1, 300), max_size=12), label="batches")
    _, store = build(hashes, batches)
    size = data.draw(st.integers(1, n), label="historical size")
    index = data.draw(st.integers(0, size - 1), label="index")
    # From size 0 any new root is consistent, so old == 0 is left to the edge-case tests.
    old = data.draw(st.integers(1, size), label="old size")
    new_root, old_root = root_of(hashes[:size]), root_of(hashes[:old])

    proof = inclusion_proof(store, index, size)
    assert verify_inclusion(hashes[index], index, size, proof, new_root)
    blob = b"".join([*proof, new_root, hashes[index]])
    at = data.draw(st.integers(0, len(blob) - 1), label="flipped byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(blob)
    bad[at] ^= flip
    parts = [bytes(bad[i : i + 32]) for i in range(0, len(bad), 32)]
    assert not verify_inclusion(parts[-1], index, size, parts[:-2], parts[-2])

    cproof = consistency_proof(store, old, size)
    assert verify_consistency(old, size, old_root, new_root, cproof)
    blob = b"".join([*cproof, old_root, new_root])
    at = data.draw(st.integers(0, len(blob) - 1), label="flipped byte (consistency)")
    bad = bytearray(blob)
    bad[at] ^= flip
    parts = [bytes(bad[i : i + 32]) for i in range(0, len(bad), 32)]
    assert not verify_consistency(old, size, parts[-2], parts[-1], parts[:-2])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 2500),
    batches=st.lists(st.integers(1, 400), max_size=20),
)
def test_root_after_any_batching_is_the_rfc_root(n: int, batches: list[int]) -> None:
    hashes = leaves(n, salt=7)
    state, store = build(hashes, batches)
    assert state.size == n
    assert root(state) == root_of(hashes)
    assert TreeState.from_bytes(state.to_bytes()) == state
    assert state_at(store, n) == state


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 600), data=st.data())
def test_proofs_at_historical_sizes_match_the_rfc_on_that_prefix(
    n: int, data: st.DataObject
) -> None:
    hashes = leaves(n, salt=3)
    _, store = build(hashes, [data.draw(st.integers(1, 64))] * 20)
    size = data.draw(st.integers(1, n))
    index = data.draw(st.integers(0, size - 1))
    old = data.draw(st.integers(1, size))
    assert inclusion_proof(store, index, size) == ref_path(index, hashes[:size])
    assert consistency_proof(store, old, size) == ref_subproof(old, hashes[:size], True)
    assert root(state_at(store, size)) == root_of(hashes[:size])


def test_every_complete_node_is_handed_out_once_with_the_right_hash() -> None:
    hashes = leaves(77)
    _, store = build(hashes, [1, 2, 3, 5, 8, 13, 21])
    want = {
        (level, index): root_of(hashes[index << level : (index + 1) << level])
        for level in range(7)
        for index in range(77 >> level)
    }
    assert store.nodes == want


def test_append_leaves_the_old_state_alone_and_reads_nothing() -> None:
    state, _ = append(TreeState(), leaves(5))
    before = state.to_bytes()
    new, nodes = append(state, leaves(3, salt=1))
    assert state.to_bytes() == before
    assert new.size == 8
    assert [(level, index) for level, index, _ in nodes] == [
        (0, 5),
        (1, 2),
        (0, 6),
        (0, 7),
        (1, 3),
        (2, 1),
        (3, 0),
    ]


def test_each_proof_is_one_store_round_trip() -> None:
    hashes = leaves(1000)
    _, store = build(hashes)
    for index, size in [(0, 1000), (999, 1000), (517, 731), (3, 4)]:
        store.calls = 0
        inclusion_proof(store, index, size)
        assert store.calls == 1
    for old, new in [(1, 1000), (999, 1000), (517, 731), (512, 1000)]:
        store.calls = 0
        consistency_proof(store, old, new)
        assert store.calls == 1
    store.calls = 0
    assert inclusion_proof(store, 0, 1) == []
    assert consistency_proof(store, 5, 5) == []
    assert consistency_proof(store, 0, 5) == []
    assert store.calls == 0


def test_proofs_read_few_nodes() -> None:
    """A proof reads O(log n) nodes: at most two per level."""
    hashes = leaves(1000)
    _, store = build(hashes)
    for index, size in [(0, 1000), (999, 1000), (517, 731), (640, 641)]:
        store.keys_read = 0
        inclusion_proof(store, index, size)
        assert store.keys_read <= 2 * size.bit_length()
    for old, new in [(1, 1000), (999, 1000), (517, 731), (5, 999)]:
        store.keys_read = 0
        consistency_proof(store, old, new)
        assert store.keys_read <= 2 * new.bit_length() + 1


def test_out_of_range_requests_are_usage_errors() -> None:
    _, store = build(leaves(10))
    with pytest.raises(UsageError):
        inclusion_proof(store, 10, 10)
    with pytest.raises(UsageError):
        inclusion_proof(store, -1, 10)
    with pytest.raises(UsageError):
        inclusion_proof(store, 0, 0)
    with pytest.raises(UsageError):
        consistency_proof(store, 6, 5)
    with pytest.raises(UsageError):
        consistency_proof(store, -1, 5)
    with pytest.raises(UsageError):
        state_at(store, -1)


def test_sizes_past_the_end_of_the_store_are_not_found() -> None:
    _, store = build(leaves(10))
    with pytest.raises(NotFoundError):
        inclusion_proof(store, 3, 11)
    with pytest.raises(NotFoundError):
        consistency_proof(store, 3, 12)
    with pytest.raises(NotFoundError):
        state_at(store, 11)


def test_tree_state_serialization_is_strict() -> None:
    assert TreeState().to_bytes() == bytes(8)
    assert TreeState.from_bytes(bytes(8)) == TreeState()
    assert root(TreeState()) == EMPTY_ROOT
    state, _ = append(TreeState(), leaves(6))
    data = state.to_bytes()
    assert len(data) == 8 + 2 * 32
    assert data[:8] == (6).to_bytes(8, "big")
    for bad in [b"", data[:7], data[:-1], data + bytes(32), data[:-32], bytes(7) + b"\x01"]:
        with pytest.raises(MalformedError):
            TreeState.from_bytes(bad)
    with pytest.raises(MalformedError):
        TreeState(3, (bytes(32),))
    with pytest.raises(MalformedError):
        TreeState(1, (bytes(31),))
    with pytest.raises(MalformedError):
        TreeState(-1, ())


def test_append_refuses_hashes_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        append(TreeState(), [b"short"])


def test_root_of_is_the_rfc_definition_for_small_trees() -> None:
    a, b, c = leaves(3)
    assert root_of([]) == hashlib.sha256(b"").digest()
    assert root_of([a]) == a
    assert root_of([a, b]) == node_hash(a, b)
    assert root_of([a, b, c]) == node_hash(node_hash(a, b), c)
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()


@pytest.mark.parametrize("pieces", [[1], [5, 0, 3], [64, 1, 200], [7] * 40])
def test_fold_gives_the_head_append_gives(pieces: list[int]) -> None:
    """The audit's fast paths (head only) against the store's `append`."""
    bodies = [b"leaf %d" % i for i in range(sum(pieces))]
    hashes = [merkle.leaf_hash(b) for b in bodies]
    folded = appended = by_body = merkle.TreeState()
    start = 0
    for n in pieces:
        folded = merkle.fold(folded, hashes[start : start + n])
        by_body = merkle.fold_leaves(by_body, bodies[start : start + n])
        appended, _ = merkle.append(appended, hashes[start : start + n])
        start += n
        assert folded == appended == by_body
    assert merkle.root(folded) == merkle.root_of(hashes)
    assert merkle.leaf_hashes(bodies) == hashes
