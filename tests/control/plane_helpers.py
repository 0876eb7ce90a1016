"""Shared by the control-plane service tests: the live policy and the log, as they read them."""

from __future__ import annotations

import json
from typing import Any

from trustplane.atomic import atomic_write
from trustplane.control.service import ControlPlane


def set_policy(plane: ControlPlane, text: str) -> None:
    """Replace the live policy file in one rename (the server re-reads it)."""
    atomic_write(plane.settings.policy_path, text.encode(), mode=0o600)
    plane.policy.current()
    assert plane.policy.error is None, plane.policy.error


def entries_since(plane: ControlPlane, start: int) -> list[dict[str, Any]]:
    size, _ = plane.log.head()
    return [json.loads(plane.log.entry(index)) for index in range(start, size)]
