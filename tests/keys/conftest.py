"""A real KMIP server (PyKMIP) for the session, and KEK providers that use it.

The server is started by the suite on 127.0.0.1 with mutual TLS. Each test
gets providers in a KEK group of its own, so tests cannot see each other's
keys. A server that cannot start fails the tests: this project never skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kmip_helpers import KmipFactory, provider_for, start_or_fail

from trustplane.embedded.kmip import RunningKmipServer
from trustplane.keys.kek_kmip import KmipKekProvider


@pytest.fixture(scope="session")
def kmip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKmipServer]:
    server = start_or_fail(tmp_path_factory.mktemp("kmip"))
    yield server
    server.stop()


@pytest.fixture
def kmip_factory(kmip_server: RunningKmipServer) -> Iterator[KmipFactory]:
    """Make providers against the session server; all are closed after the test."""
    made: list[KmipKekProvider] = []

    def make(group: str | None = None, **kwargs: Any) -> KmipKekProvider:
        provider = provider_for(kmip_server, group, **kwargs)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()
