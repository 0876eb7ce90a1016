"""How a test run reports a component it cannot have: it fails, never skips.

Kept out of conftest.py so that fixture modules that conftest imports
(pg_fixture, guest_fixture) can use it too.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def component_missing(name: str, why: str) -> NoReturn:
    """Fail the test for a missing component; never skip, in CI or on a laptop."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} unavailable in CI (a missing component fails CI): {why}")
    pytest.fail(f"{name} unavailable: {why} (trustplane tests never skip; install or start it)")
