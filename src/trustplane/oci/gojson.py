"""JSON encoded the way Go's encoding/json encodes it.

Manifests and configs are content-addressed: the digest is over the exact
bytes. skopeo, containerd and Docker are Go programs, so to produce the very
bytes they produce (for example, the original manifest after decryption) we
need Go's encoding, which Python's json module does not give: no spaces,
UTF-8 kept raw, `<`, `>`, `&`, U+2028 and U+2029 escaped as \\u003c etc., and
control characters as \\u00XX except \\n, \\r, \\t (Go before 1.22, which
Debian's skopeo is built with). Key order is the order of the input mapping
(Go: struct field order, sorted keys for maps).
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
for _code in (*range(0x20), 0x3C, 0x3E, 0x26, 0x2028, 0x2029):
    _ESCAPES.setdefault(chr(_code), f"\\u{_code:04x}")
# Lone surrogates (json.loads gives them for "\\ud800") are invalid UTF-8;
# Go decodes them as U+FFFD and prints that.
for _code in range(0xD800, 0xE000):
    _ESCAPES[chr(_code)] = "\ufffd"
_TABLE = str.maketrans(_ESCAPES)


def dumps(value: Any) -> bytes:
    """Encode `value` (dicts, lists, str, int, bool, None) as Go would."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts).encode()


def _encode(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append('"' + value.translate(_TABLE) + '"')
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_float(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            _encode(str(key), out)
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _float(value: float) -> str:
    # Go (floatEncoder): the shortest digits that round-trip, as with repr;
    # %e below 1e-6 and from 1e21 on (with e-07 cleaned to e-7), else %f.
    if not math.isfinite(value):
        raise ValueError(f"json: unsupported value: {value!r}")
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        return re.sub(r"e-0(\d)$", r"e-\1", repr(value))
    return format(decimal.Decimal(repr(value)).normalize(), "f")
