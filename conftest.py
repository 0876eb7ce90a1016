"""Fixtures shared across test directories (pytest loads this file first).

`dm_guest` (a QEMU guest whose kernel has device-mapper,
tests/integration/guest_fixture.py) is session-scoped and used by
tests/integration and tests/layerstore (the device-mapper layer-store
backend runs in it): defined once here, so a whole run boots one guest.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests" / "integration"))

from guest_fixture import dm_guest  # noqa: F401
