"""Field rules several areas of the API share."""

from __future__ import annotations

import math

DIGEST = r"^sha(256:[a-f0-9]{64}|512:[a-f0-9]{128})$"
"""A content digest the control plane records (sha256 or sha512, lower-case hex)."""
NAME = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$"
"""A user or node name."""
REPOSITORY = r"^[!-~]+$"
"""A repository name in a query: printable ASCII, no spaces."""
UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
MAX_FIELDS = 32
MAX_TEXT = 1024
Scalar = str | int | float | bool | None


def bounded_details(value: dict[str, Scalar], reserved: tuple[str, ...] = ()) -> dict[str, Scalar]:
    """Flat, short, finite scalars under plain names: what may go into a log entry."""
    if len(value) > MAX_FIELDS:
        raise ValueError(f"at most {MAX_FIELDS} details")
    for key, item in value.items():
        if not key or len(key) > 64 or not key.replace("_", "").isalnum() or not key.isascii():
            raise ValueError("detail names are 1-64 letters, digits and underscores")
        if key in reserved:
            raise ValueError(f"detail name {key!r} is reserved")
        if isinstance(item, str) and len(item) > MAX_TEXT:
            raise ValueError(f"detail {key} is longer than {MAX_TEXT} characters")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"detail {key} is not a finite number")
    return value
