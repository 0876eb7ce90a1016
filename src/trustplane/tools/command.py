"""What one external-tool call is: argv with secret placeholders, input, working directory.

A secret never appears in argv or the environment. A caller puts a
`SecretFile` or `SecretFd` placeholder where the tool expects a path; the
runner decides how the value reaches the process (a 0600 file in a private
directory, an inherited descriptor) and fills in the path. Plain strings are
never secret: there is no way to hand the executor a secret as one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

_SLOT = "{}"


def _check(value: bytes, template: str) -> None:
    if not isinstance(value, bytes):
        raise TypeError("a secret is bytes")
    if template.count(_SLOT) != 1:
        raise ValueError(f"a secret template holds '{{}}' exactly once: {template!r}")


@dataclass(frozen=True)
class SecretFile:
    """Argv placeholder: `value` in a 0600 file in a private 0700 directory.

    The argument becomes `template` with the file's path at `{}`, e.g.
    `SecretFile(key, "secret,id=s0,file={}")` for QEMU's `--object`. The
    file is removed as soon as the call returns (for a long-running tool: as
    soon as it is ready), whether the tool succeeded, failed or timed out.
    """

    value: bytes = field(repr=False)
    template: str = _SLOT

    def __post_init__(self) -> None:
        _check(self.value, self.template)


@dataclass(frozen=True)
class SecretFd:
    """Argv placeholder: `value` readable on an inherited descriptor, as `/dev/fd/N`.

    For tools that read a key file once (`cryptsetup --key-file`). Nothing
    with a name is left on any filesystem.
    """

    value: bytes = field(repr=False)
    template: str = _SLOT

    def __post_init__(self) -> None:
        _check(self.value, self.template)


SecretArg = SecretFile | SecretFd
Arg = str | os.PathLike[str] | SecretFile | SecretFd

STDIN_REDACT_LIMIT = 64 * 1024
"""Input up to this size is treated as a secret when error lines are redacted."""


@dataclass(frozen=True)
class Command:
    """One call of an external tool, before a runner places its secrets."""

    argv: tuple[Arg, ...]
    stdin: bytes | None = field(default=None, repr=False)
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    cwd: str | None = None

    def __post_init__(self) -> None:
        if not self.argv or not isinstance(self.argv[0], str | os.PathLike):
            raise ValueError("argv[0] names the tool")
        if self.stdin is not None and not isinstance(self.stdin, bytes):
            raise TypeError("stdin is bytes")

    @classmethod
    def of(
        cls,
        argv: Sequence[Arg],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Command:
        return cls(
            tuple(argv),
            stdin,
            MappingProxyType(dict(env or {})),
            os.fspath(cwd) if cwd is not None else None,
        )

    @property
    def tool(self) -> str:
        """The tool's name as errors show it (basename of argv[0])."""
        return Path(self.argv[0]).name  # type: ignore[arg-type]

    @property
    def placeholders(self) -> list[SecretArg]:
        return [a for a in self.argv if isinstance(a, SecretFile | SecretFd)]

    def secrets(self) -> list[bytes]:
        """Every value that must never show up in an error message."""
        values = [p.value for p in self.placeholders]
        if self.stdin is not None and len(self.stdin) <= STDIN_REDACT_LIMIT:
            values.append(self.stdin)
        return values

    def render(self, place: Callable[[int, SecretArg], str]) -> list[str]:
        """argv as strings; `place(i, placeholder)` returns where the i-th secret is."""
        out: list[str] = []
        index = 0
        for arg in self.argv:
            if isinstance(arg, SecretFile | SecretFd):
                out.append(arg.template.replace(_SLOT, place(index, arg)))
                index += 1
            else:
                out.append(os.fspath(arg))
        return out


def redact(line: bytes, secrets: Sequence[bytes]) -> bytes:
    """`line` with every secret (and every longer line of one) blanked out."""
    for value in secrets:
        pieces = [value, *(p for p in value.splitlines() if len(p) >= 8)]
        for piece in pieces:
            if len(piece) >= 4:
                line = line.replace(piece, b"[secret]")
    return line
