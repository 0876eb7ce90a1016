"""Layer-store fixtures: every test's loop devices, FUSE mounts and daemons are its own.

Several helpers run tests on this machine at once, so a test touches only
what lies under its own tmp_path, and whatever it leaves there (a test that
failed half-way) is cleaned up here, and reported as a failure of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_checks import clean, leftovers

from trustplane.layerstore.qcow2 import Qcow2Backend
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


@pytest.fixture
def backend(tmp_path: Path, executor: Executor) -> Qcow2Backend:
    return Qcow2Backend(tmp_path / "qcow2", executor)
