"""The snapshotter's metadata: containerd's snapshot rules as a persisted state machine,
and containerd's filter syntax for List. No tools run here: the table alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustplane.errors import (
    AlreadyExistsError,
    ConflictError,
    MalformedError,
    NotFoundError,
    UsageError,
)
from trustplane.layerstore.keys import ChainRef
from trustplane.layerstore.snapshot_filters import parse
from trustplane.layerstore.snapshots import MAX_LABEL_BYTES, Kind, SnapshotTable, State

CHAIN = ChainRef("https://plane", "chain-1")


def table(tmp_path: Path) -> SnapshotTable:
    return SnapshotTable(tmp_path / "snapshots.json")


def committed(t: SnapshotTable, name: str, parent: str = "", layer: str = "l") -> None:
    """An active made and committed under `name` (its key is NAME-active)."""
    key = f"{name}-active"
    t.begin_create(key, parent, Kind.ACTIVE, {}, f"{layer}-{name}")
    t.set_key_ref(key, ChainRef("https://plane", f"chain-{name}"))
    t.finish_create(key)
    t.begin_commit(name, key, {"containerd.io/snapshot.ref": name})
    t.finish_commit(key)


def test_create_is_invisible_until_finished_and_survives_a_restart(tmp_path: Path) -> None:
    t = table(tmp_path)
    t.begin_create("a", "", Kind.ACTIVE, {"x": "1"}, "layer-a")
    with pytest.raises(NotFoundError):
        t.get("a")
    assert t.visible() == []
    # Written before any resource is made: a new process sees what to undo.
    again = table(tmp_path)
    record = again.find("a")
    assert record is not None
    assert record.state is State.CREATING
    assert record.layer == "layer-a"
    again.set_key_ref("a", CHAIN)
    again.finish_create("a")
    found = table(tmp_path).get("a")
    assert (found.kind, found.state, found.labels) == (Kind.ACTIVE, State.READY, {"x": "1"})
    assert found.key_ref is not None
    assert found.key_ref.chain == CHAIN


def test_create_checks_key_and_parent(tmp_path: Path) -> None:
    t = table(tmp_path)
    committed(t, "base")
    t.begin_create("a", "base", Kind.ACTIVE, {}, "la")
    t.finish_create("a")
    with pytest.raises(AlreadyExistsError):
        t.begin_create("a", "base", Kind.VIEW, {}, None)
    with pytest.raises(AlreadyExistsError):  # keys and names share one key space
        t.begin_create("base", "", Kind.ACTIVE, {}, "lx")
    with pytest.raises(NotFoundError):
        t.begin_create("b", "missing", Kind.ACTIVE, {}, "lb")
    with pytest.raises(UsageError, match="not a committed snapshot"):
        t.begin_create("b", "a", Kind.ACTIVE, {}, "lb")  # actives are never parents
    with pytest.raises(UsageError):
        t.begin_create("", "", Kind.ACTIVE, {}, "lb")
    with pytest.raises(UsageError):
        t.begin_create("c", "", Kind.COMMITTED, {}, "lc")
    # None of the refused requests left a record.
    assert sorted(s.key for s in t.all()) == ["a", "base"]


def test_commit_renames_the_active_and_keeps_its_layer_and_key(tmp_path: Path) -> None:
    t = table(tmp_path)
    t.begin_create("k", "", Kind.ACTIVE, {"prepare": "label"}, "layer-k")
    t.set_key_ref("k", CHAIN)
    t.finish_create("k")
    busy = t.begin_commit("name", "k", {"commit": "label"})
    assert busy.state is State.COMMITTING
    assert t.get("k").state is State.COMMITTING
    with pytest.raises(ConflictError):  # busy: no second commit, no removal meanwhile
        t.begin_commit("other", "k", {})
    with pytest.raises(ConflictError):
        t.begin_remove("k")
    with pytest.raises(AlreadyExistsError):  # the name is reserved while committing
        t.begin_create("name", "", Kind.ACTIVE, {}, "x")
    done = t.finish_commit("k")
    assert t.find("k") is None
    assert (done.key, done.kind, done.layer, done.labels) == (
        "name",
        Kind.COMMITTED,
        "layer-k",
        {"commit": "label"},
    )
    assert done.key_ref is not None
    assert done.key_ref.chain == CHAIN
    assert table(tmp_path).get("name") == done


def test_commit_refusals(tmp_path: Path) -> None:
    t = table(tmp_path)
    committed(t, "base")
    t.begin_create("view", "base", Kind.VIEW, {}, None)
    t.finish_create("view")
    t.begin_create("act", "base", Kind.ACTIVE, {}, "la")
    t.finish_create("act")
    with pytest.raises(ConflictError, match="not active"):
        t.begin_commit("n", "view", {})
    with pytest.raises(ConflictError, match="not active"):
        t.begin_commit("n", "base", {})
    with pytest.raises(NotFoundError):
        t.begin_commit("n", "missing", {})
    with pytest.raises(AlreadyExistsError):
        t.begin_commit("base", "act", {})
    t.begin_commit("n", "act", {})
    undone = t.abort_commit("act")
    assert (undone.state, undone.commit_name) == (State.READY, None)
    assert t.find("n") is None


def test_remove_refuses_a_snapshot_with_children(tmp_path: Path) -> None:
    t = table(tmp_path)
    committed(t, "base")
    committed(t, "top", parent="base")
    with pytest.raises(ConflictError, match="children"):
        t.begin_remove("base")
    # A child still being made counts too: its parent must not go under it.
    t.begin_create("c", "top", Kind.ACTIVE, {}, "lc")
    with pytest.raises(ConflictError, match="children"):
        t.begin_remove("top")
    t.abort("c")
    removing = t.begin_remove("top")
    assert removing.state is State.REMOVING
    with pytest.raises(NotFoundError):  # invisible from now on
        t.get("top")
    assert table(tmp_path).find("top") is not None  # and recorded for recovery
    t.abort_remove("top")
    assert t.get("top").state is State.READY
    t.begin_remove("top")
    t.finish_remove("top")
    t.begin_remove("base")
    t.finish_remove("base")
    assert t.all() == []
    assert table(tmp_path).all() == []
    with pytest.raises(NotFoundError):
        t.begin_remove("base")


def test_ancestry_and_layers(tmp_path: Path) -> None:
    t = table(tmp_path)
    committed(t, "a")
    committed(t, "b", parent="a")
    committed(t, "c", parent="b")
    assert [s.key for s in t.ancestry("c")] == ["a", "b", "c"]
    assert t.layers() == {"l-a", "l-b", "l-c"}
    assert [s.key for s in t.children("a")] == ["b"]


def test_update_changes_labels_only(tmp_path: Path) -> None:
    t = table(tmp_path)
    committed(t, "s")
    before = t.get("s")
    t.update_labels("s", {"a": "1", "b": "2"}, [])
    assert t.get("s").labels == {"a": "1", "b": "2"}
    t.update_labels("s", {"b": "3", "c": "4"}, ["labels.b"])  # one label; c is not asked for
    assert t.get("s").labels == {"a": "1", "b": "3"}
    t.update_labels("s", {}, ["labels.a"])  # empty or missing: the label goes
    assert t.get("s").labels == {"b": "3"}
    updated = t.update_labels("s", {"z": "9"}, ["labels"])
    assert updated.labels == {"z": "9"}
    assert updated.updated > before.updated
    assert updated.created == before.created
    with pytest.raises(UsageError, match="only labels"):
        t.update_labels("s", {}, ["parent"])
    with pytest.raises(UsageError):
        t.update_labels("s", {"k": "v" * MAX_LABEL_BYTES}, [])
    with pytest.raises(NotFoundError):
        t.update_labels("missing", {}, [])
    assert table(tmp_path).get("s").labels == {"z": "9"}


def test_shred_queue_is_persisted(tmp_path: Path) -> None:
    t = table(tmp_path)
    other = ChainRef("https://plane", "chain-2")
    t.queue_shred(CHAIN)
    t.queue_shred(CHAIN)
    t.queue_shred(other)
    assert table(tmp_path).pending_shreds() == [CHAIN, other]
    t.shredded(CHAIN)
    assert table(tmp_path).pending_shreds() == [other]


def test_a_damaged_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.json"
    path.write_text('{"version": 1, "snapshots": {"a": {"key": "b"}}}')
    with pytest.raises(MalformedError):
        SnapshotTable(path)
    path.write_text("not json")
    with pytest.raises(MalformedError):
        SnapshotTable(path)


# -- containerd's filter syntax ------------------------------------------------------


def matches(filters: list[str], fields: dict[str, str]) -> bool:
    return parse(filters).match(lambda path: fields.get(".".join(path)))


FIELDS = {
    "name": "ns/3/sha256:abc",
    "parent": "ns/2/base",
    "kind": "committed",
    "labels.containerd.io/snapshot.ref": "sha256:abc",
    "labels.with space": "v",
}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], True),
        ([""], True),
        (["kind==committed"], True),
        (["kind==active"], False),
        (["kind!=active"], True),
        (["labels.missing!=x"], True),  # a missing field compares as ""
        (['labels.missing!=""'], False),
        (['labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/2/base"'], True),
        (['labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/2/other"'], False),
        (['labels."containerd.io/snapshot.ref"'], True),
        (["labels.absent"], False),
        (['labels."with space"==v'], True),
        (["name~=^ns/3/"], True),
        (["name~=/sha256:a/"], True),
        (["name~=^ns/4/"], False),
        (["kind==active", "kind==committed"], True),  # several filters: any of them
        (["kind==active", "kind==view"], False),
        (["kind == committed"], True),
    ],
)
def test_filters(filters: list[str], expected: bool) -> None:
    assert matches(filters, FIELDS) is expected


@pytest.mark.parametrize(
    "bad", ["==x", "kind=x", 'labels."open==x', "name~=[", "kind==a,", "kind==a b", "9kind"]
)
def test_bad_filters_are_invalid_arguments(bad: str) -> None:
    with pytest.raises(UsageError, match="filter"):
        parse([bad])
