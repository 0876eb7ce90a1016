"""containerd's filter syntax, for the snapshots API's List (Walk) filters.

containerd's `filters` package (1.6) defines it; written here from its grammar:

    selectors := selector ("," selector)*          all must match
    selector  := fieldpath [operator value]        no operator: the field is present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z][A-Za-z0-9_]*
    operator  := "==" | "!=" | "~="                 ~= is a regular expression (search)
    value     := quoted | [^\\s,]+                  ~= also takes /re/ or |re|

Several filter strings match when any of them does; none matches everything.
Quoted strings are double-quoted with JSON's escapes (a subset of Go's), or
back-quoted raw. containerd's garbage collector lists without filters; its
unpacker asks for `labels."containerd.io/snapshot.ref"==REF,parent=="P"`.
A bad filter is a `UsageError` (gRPC INVALID_ARGUMENT, as containerd answers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trustplane.errors import UsageError

Field = Callable[[Sequence[str]], str | None]
"""The value at a field path, or None when the object has no such field."""

_FIELD = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_OPERATORS = ("==", "!=", "~=")
_PLAIN_VALUE = re.compile(r"[^\s,]+")


@dataclass(frozen=True)
class _Selector:
    path: tuple[str, ...]
    operator: str | None
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, field: Field) -> bool:
        found = field(self.path)
        if self.operator is None:
            return found is not None
        if self.operator == "==":
            return found is not None and found == self.value
        if self.operator == "!=":
            # containerd compares the missing field as "": it differs unless the value is empty.
            return (found or "") != self.value
        assert self.pattern is not None
        return self.pattern.search(found or "") is not None


@dataclass(frozen=True)
class Filter:
    """Any of several filters, each all of its selectors; empty matches everything."""

    alternatives: tuple[tuple[_Selector, ...], ...]

    def match(self, field: Field) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(field) for s in selectors) for selectors in self.alternatives)


def parse(filters: Sequence[str]) -> Filter:
    return Filter(tuple(_Parser(text).selectors() for text in filters if text != ""))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> UsageError:
        return UsageError(f"filter {self.text!r}: {what} at character {self.pos}")

    def selectors(self) -> tuple[_Selector, ...]:
        found = [self.selector()]
        while self.pos < len(self.text):
            if self.text[self.pos] != ",":
                raise self.fail("expected ','")
            self.pos += 1
            found.append(self.selector())
        return tuple(found)

    def selector(self) -> _Selector:
        path = [self.field()]
        while self.peek("."):
            self.pos += 1
            path.append(self.field())
        self.skip_space()
        if self.pos >= len(self.text) or self.text[self.pos] == ",":
            return _Selector(tuple(path), None)
        operator = next((op for op in _OPERATORS if self.text.startswith(op, self.pos)), None)
        if operator is None:
            raise self.fail("expected '==', '!=' or '~='")
        self.pos += len(operator)
        self.skip_space()
        value = self.value(regex=operator == "~=")
        self.skip_space()
        if operator != "~=":
            return _Selector(tuple(path), operator, value)
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise self.fail(f"bad regular expression ({exc})") from None
        return _Selector(tuple(path), operator, value, pattern)

    def field(self) -> str:
        self.skip_space()
        if self.peek('"') or self.peek("`"):
            return self.quoted()
        match = _FIELD.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a field name")
        self.pos = match.end()
        return match.group()

    def value(self, *, regex: bool) -> str:
        if self.peek('"') or self.peek("`"):
            return self.quoted()
        if regex and (self.peek("/") or self.peek("|")):
            return self.quoted(self.text[self.pos])
        match = _PLAIN_VALUE.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a value")
        self.pos = match.end()
        return match.group()

    def quoted(self, quote: str | None = None) -> str:
        quote = quote or self.text[self.pos]
        start = self.pos
        self.pos += 1
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\" and quote == '"':
                self.pos += 2
                continue
            self.pos += 1
            if char == quote:
                body = self.text[start + 1 : self.pos - 1]
                if quote != '"':
                    return body  # raw
                try:
                    value = json.loads(self.text[start : self.pos])
                except ValueError:
                    raise self.fail("bad escape in a quoted string") from None
                assert isinstance(value, str)
                return value
        raise self.fail("unterminated quoted string")

    def peek(self, char: str) -> bool:
        return self.text.startswith(char, self.pos)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
