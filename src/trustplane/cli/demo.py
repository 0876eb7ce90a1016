"""`trustplane demo` (placeholder until the embedded components land)."""

from __future__ import annotations


def demo() -> None:
    """Run the end-to-end demonstration on loopback."""
    raise NotImplementedError
