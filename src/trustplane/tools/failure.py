"""One error for a failed tool call, and nothing secret in it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from trustplane.errors import ToolError, ToolTimeout, TrustplaneError
from trustplane.tools.command import Command, redact

_LINE_LIMIT = 300

FailureMap = Mapping[str, type[TrustplaneError]]
"""stderr substring → the error class to raise instead of ToolError (e.g. a
wrong key: `{"No key available with this passphrase": DecryptionKeyError}`)."""


def last_line(output: bytes, secrets: Sequence[bytes] = ()) -> str:
    """The last non-empty line of `output`, secrets blanked out, shortened for one-line errors."""
    for raw in reversed(output.splitlines()):
        line = redact(raw, secrets).decode("utf-8", errors="replace").strip()
        if line:
            return line if len(line) <= _LINE_LIMIT else line[: _LINE_LIMIT - 1] + "…"
    return ""


def failure(
    command: Command,
    what: str,
    output: bytes,
    *,
    returncode: int | None,
    timed_out: bool = False,
    failures: FailureMap | None = None,
) -> TrustplaneError:
    """One error for a failed call: `<tool> <what>: <last stderr line>`."""
    line = last_line(output, command.secrets())
    message = f"{command.tool} {what}" + (f": {line}" if line else " (no error output)")
    cls = ToolTimeout if timed_out else ToolError
    error: TrustplaneError = cls(message, tool=command.tool, returncode=returncode)
    if not timed_out:
        text = output.decode("utf-8", errors="replace")
        for needle, mapped in (failures or {}).items():
            if needle in text:
                specific = mapped(message)
                specific.__cause__ = error
                return specific
    return error


def exit_text(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"was killed by signal {-returncode}"
    return f"failed with exit status {returncode}"
