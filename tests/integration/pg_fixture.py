"""Session fixture `postgres`: a private PostgreSQL server on 127.0.0.1.

Kept out of conftest.py so that it can be imported from both conftest.py and
test modules (``from pg_fixture import postgres``). The cluster lives in its
own temporary directory under /tmp, not in pytest's tmp tree: that tree is
0700 root, and the server runs as the `postgres` user (see
trustplane.embedded.postgres). `stop()` removes it at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from missing import component_missing

from trustplane.embedded.postgres import RunningPostgres, start_postgres
from trustplane.errors import TrustplaneError


@pytest.fixture(scope="session")
def postgres() -> Iterator[RunningPostgres]:
    """One server for the session, with database and role `trustplane`."""
    try:
        server = start_postgres()
    except TrustplaneError as exc:
        component_missing("PostgreSQL", str(exc))
    yield server
    server.stop()
