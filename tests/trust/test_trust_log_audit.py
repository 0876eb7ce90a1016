"""The monitor's audit: a log whose stored entries are intact passes; one
altered, missing or inserted entry is named, whatever its position."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from trustplane.trust import log_audit
from trustplane.trust.merkle import (
    MemoryNodeStore,
    TreeState,
    append,
    consistency_proof,
    leaf_hash,
    root,
)

SIZE = 1000


@pytest.fixture(autouse=True)
def small_strides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strides and pages far below the size, so every path is taken."""
    monkeypatch.setattr(log_audit, "STRIDE", 64)
    monkeypatch.setattr(log_audit, "PAGE", 300)


class Log:
    """A log's stored tree (nodes, signed root) and its stored entries, which an
    insider may change without touching the tree."""

    def __init__(self, size: int = SIZE) -> None:
        self.bodies = [b'{"kind":"test","n":%d}' % i for i in range(size)]
        self.store = MemoryNodeStore()
        state, nodes = append(TreeState(), [leaf_hash(b) for b in self.bodies])
        self.store.put_nodes(nodes)
        self.size, self.root = state.size, root(state)
        self.proofs = 0

    def entries(self, start: int, end: int) -> Iterator[Sequence[bytes]]:
        for first in range(start, end, 50):  # batches, as pages arrive
            yield self.bodies[first : min(end, first + 50)]

    def proof(self, old: int, new: int) -> list[bytes]:
        self.proofs += 1
        return consistency_proof(self.store, old, new)

    def audit(self, known: tuple[int, bytes] | None = None) -> log_audit.Audit:
        seen: list[int] = []
        result = log_audit.audit(
            self.size, self.root, self.entries, self.proof, known, progress=seen.append
        )
        assert seen == sorted(seen)
        return result


def test_an_intact_log_passes() -> None:
    log = Log()
    result = log.audit(known=(700, root(_state(log.bodies[:700]))))
    assert result.finding is None
    assert result.root == log.root
    assert log.proofs == 0


def _state(bodies: list[bytes]) -> TreeState:
    state, _ = append(TreeState(), [leaf_hash(b) for b in bodies])
    return state


@pytest.mark.parametrize("index", [0, 1, 63, 64, 65, 299, 300, 511, 512, 700, 998, 999])
def test_an_altered_entry_is_named(index: int) -> None:
    log = Log()
    log.bodies[index] = log.bodies[index].replace(b"test", b"TEST")
    result = log.audit()
    assert result.finding is not None
    assert result.finding.index == index
    assert f"entry {index} does not fit" in result.finding.reason
    assert log.proofs <= 2 * SIZE.bit_length()


def test_a_removed_entry_is_named() -> None:
    log = Log()
    del log.bodies[400]
    result = log.audit()
    assert result.finding is not None
    assert result.finding.index == SIZE - 1  # the log ends one short ...
    log = Log()
    log.bodies[400:401] = []
    log.bodies.append(b"padding")  # ... or, padded to its size, every later entry moved
    assert log.audit().finding == log_audit.Finding(
        400,
        "entry 400 does not fit the signed checkpoint of 1000 entries: the stored entry is "
        "not the one the tree was built with (altered, removed or inserted)",
    )


def test_an_inserted_entry_is_named() -> None:
    log = Log()
    log.bodies.insert(250, b"slipped in")
    result = log.audit()
    assert result.finding is not None
    assert result.finding.index == 250


def test_a_log_that_ends_early_is_named() -> None:
    log = Log()
    del log.bodies[900:]
    result = log.audit()
    assert result.finding is not None
    assert result.finding.index == 900
    assert "missing" in result.finding.reason


def test_a_history_unlike_the_checkpoint_seen_before_fails() -> None:
    log = Log()
    earlier = _state([b"other"] * 700)
    result = log.audit(known=(700, root(earlier)))
    assert result.finding is not None
    assert result.finding.index is None
    assert "history was rewritten" in result.finding.reason


def test_an_empty_log_passes() -> None:
    log = Log(0)
    assert log.audit().finding is None
