"""A whole control plane in-process: `control.service.build` on a directory of the test's.

Real SQLite database (migrated), real file KEK store, real policy file and
transparency log; only HTTP is left out, so the services' rules are
exercised directly, as the routers call them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trustplane.control.service import ControlPlane, build
from trustplane.control.settings import ServerSettings


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    built = build(ServerSettings(data_dir=tmp_path / "data"), announce=False)
    yield built
    built.close()
