"""Helpers for the KMIP tests: start the real server or fail, make providers."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from trustplane.embedded.kmip import RunningKmipServer, start_kmip_server
from trustplane.errors import TrustplaneError
from trustplane.keys.kek_kmip import KmipKekProvider

KmipFactory = Callable[..., KmipKekProvider]


def component_missing(name: str, why: str) -> NoReturn:
    """Fail the test for a missing component; never skip, in CI or on a laptop."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} unavailable in CI (a missing component fails CI): {why}")
    pytest.fail(f"{name} unavailable: {why} (trustplane tests never skip; install or start it)")


def start_or_fail(work_dir: Path, **kwargs: Any) -> RunningKmipServer:
    try:
        return start_kmip_server(work_dir, **kwargs)
    except TrustplaneError as exc:
        component_missing("PyKMIP server (pip install pykmip)", str(exc))


def provider_for(
    server: RunningKmipServer, group: str | None = None, **kwargs: Any
) -> KmipKekProvider:
    """A provider with the server's client identity; a fresh KEK group unless one is named."""
    return KmipKekProvider(
        server.host,
        server.port,
        ca_file=server.ca_file,
        cert_file=kwargs.pop("cert_file", server.client_cert),
        key_file=kwargs.pop("key_file", server.client_key),
        server_name=kwargs.pop("server_name", server.server_name),
        group=group if group is not None else f"test-{secrets.token_hex(6)}",
        **kwargs,
    )
