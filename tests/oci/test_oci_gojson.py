"""gojson prints what Go's encoding/json.Marshal prints.

Expected bytes are written out literally, as Go (1.19, the toolchain of
Debian's skopeo 1.9.3) prints them for the same value.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustplane.oci import gojson


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # HTML-sensitive characters are escaped (json.Marshal uses HTMLEscape).
        ("<a href='x'>&</a>", b"\"\\u003ca href='x'\\u003e\\u0026\\u003c/a\\u003e\""),
        # U+2028 and U+2029 are escaped for JavaScript's sake.
        ("line\u2028sep\u2029", b'"line\\u2028sep\\u2029"'),
        # Short escapes only for \n \r \t; other controls as \u00XX in lower hex.
        ("\n\r\t", b'"\\n\\r\\t"'),
        ("\x00\x01\x1f", b'"\\u0000\\u0001\\u001f"'),
        ("\x08\x0c", b'"\\u0008\\u000c"'),
        ('quote " backslash \\ slash /', b'"quote \\" backslash \\\\ slash /"'),
        # DEL and everything non-ASCII goes through raw, as UTF-8.
        ("\x7f", b'"\x7f"'),
        ("caf\u00e9 \u65e5\u672c \U0001f600", '"caf\u00e9 \u65e5\u672c \U0001f600"'.encode()),
        (None, b"null"),
        (True, b"true"),
        (False, b"false"),
        (0, b"0"),
        (-12, b"-12"),
        (2**63 - 1, b"9223372036854775807"),
        ([], b"[]"),
        ({}, b"{}"),
        ((1, "a"), b'[1,"a"]'),
        (
            {"b": 1, "a": [True, None], "c": {"<": ">"}},
            b'{"b":1,"a":[true,null],"c":{"\\u003c":"\\u003e"}}',
        ),
    ],
)
def test_encodes_like_go(value: Any, expected: bytes) -> None:
    assert gojson.dumps(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, b"1"),
        (-3.0, b"-3"),
        (1.5, b"1.5"),
        (0.1, b"0.1"),
        (123456789.125, b"123456789.125"),
        (1e20, b"100000000000000000000"),
        (1e21, b"1e+21"),
        (1.5e300, b"1.5e+300"),
        # Go uses %f down to 1e-6 and cleans e-07 to e-7 below that.
        (0.00001, b"0.00001"),
        (0.000001, b"0.000001"),
        (1e-7, b"1e-7"),
        (2.5e-10, b"2.5e-10"),
        (5e-324, b"5e-324"),
        (-0.0, b"-0"),
    ],
)
def test_floats_like_go(value: float, expected: bytes) -> None:
    assert gojson.dumps(value) == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_like_go(value: float) -> None:
    # Go: json: unsupported value: NaN
    with pytest.raises(ValueError, match="unsupported"):
        gojson.dumps({"x": value})


def test_lone_surrogates_become_replacement_characters() -> None:
    # Python's json reads "\ud800" as a lone surrogate; Go decodes it to
    # U+FFFD and prints that raw.
    value = json.loads('{"a":"x\\ud800y"}')
    assert gojson.dumps(value) == '{"a":"x\ufffdy"}'.encode()


def test_key_order_is_the_mapping_order() -> None:
    assert gojson.dumps({"z": 1, "a": 2, "m": 3}) == b'{"z":1,"a":2,"m":3}'


def test_non_string_keys_are_stringified() -> None:
    assert gojson.dumps({1: "a"}) == b'{"1":"a"}'


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", bytearray(b"x")])
def test_unknown_types_are_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        gojson.dumps(value)


# -- against an independent model of Go's string encoder -------------------------------


def go_string(text: str) -> str:
    """encoding/json encodeState.string with escapeHTML=true (Go < 1.22)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if code < 0x80:
            if ch in '"\\':
                out.append("\\" + ch)
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\r":
                out.append("\\r")
            elif ch == "\t":
                out.append("\\t")
            elif code < 0x20 or ch in "<>&":
                out.append("\\u00" + "0123456789abcdef"[code >> 4] + "0123456789abcdef"[code & 15])
            else:
                out.append(ch)
        elif code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def same(decoded: Any, original: Any) -> bool:
    """Equal, reading a float back as the float it names (Go prints 1e16 as
    10000000000000000, which json.loads gives as an int)."""
    if isinstance(original, float):
        return isinstance(decoded, int | float) and float(decoded) == original
    if isinstance(original, list):
        return len(decoded) == len(original) and all(map(same, decoded, original))
    if isinstance(original, dict):
        return list(decoded) == list(original) and all(
            same(decoded[k], original[k]) for k in original
        )
    return type(decoded) is type(original) and bool(decoded == original)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_roundtrips_through_json_loads(value: Any) -> None:
    encoded = gojson.dumps(value)
    assert same(json.loads(encoded), value)
    text = encoded.decode("utf-8")
    for forbidden in ("<", ">", "&", "\u2028", "\u2029", "\n"):
        assert forbidden not in text
    assert all(ord(ch) >= 0x20 for ch in text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8")))
def test_strings_match_the_go_model(text: str) -> None:
    assert gojson.dumps(text) == go_string(text).encode()


def test_whole_manifest_like_document() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "annotations": {"note": "a&b <c>"},
    }
    assert gojson.dumps(doc) == (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"annotations":{"note":"a\\u0026b \\u003cc\\u003e"}}'
    )
