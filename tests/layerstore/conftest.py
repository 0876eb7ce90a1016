"""Layer-store fixtures: every test's loop devices, FUSE mounts and daemons are its own.

Several helpers run tests on this machine at once, so a test touches only
what lies under its own tmp_path, and whatever it leaves there (a test that
failed half-way) is cleaned up here, and reported as a failure of its own.

`backend` is parametrized over both backends (backend_kinds.py): the
device-mapper one runs in the session's QEMU guest (`dm_guest`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_kinds import KINDS, Backend, backend_of
from store_checks import clean, leftovers

from trustplane.tools import Executor


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path: Path) -> Iterator[None]:
    """After each test: no mount, loop device or daemon of its own may remain."""
    prefix = os.fspath(tmp_path) + "/"
    yield
    left = leftovers(prefix)
    clean(prefix)
    assert left == [], f"the test left {left}"


@pytest.fixture
def executor(tmp_path: Path) -> Executor:
    return Executor(timeout=120)


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh backend of each kind, its store root under tmp_path."""
    with backend_of(request.param, tmp_path / "store", request) as under_test:
        yield under_test
