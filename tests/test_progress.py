"""Progress bars: on a terminal only, and gone when the operation fails (its
error is then the one line on stderr)."""

from __future__ import annotations

import contextlib
import io

import pytest
from rich.console import Console

from trustplane.progress import THRESHOLD, Reporter


class Failed(Exception):
    pass


def _run(console: Console, fail: bool) -> None:
    with Reporter(console=console) as reporter:
        advance = reporter.bar("push layer 0", THRESHOLD)
        advance(THRESHOLD // 2)
        if fail:
            raise Failed


@pytest.mark.parametrize("fail", [False, True])
def test_no_bars_where_nobody_watches(fail: bool) -> None:
    """A pipe or a log file gets no bars: only what the command prints itself."""
    out = io.StringIO()
    with contextlib.suppress(Failed):
        _run(Console(file=out, force_terminal=False), fail)
    assert out.getvalue() == ""


def test_a_failure_clears_the_bars_from_the_terminal() -> None:
    out = io.StringIO()
    with pytest.raises(Failed):
        _run(Console(file=out, force_terminal=True, width=80), True)
    shown = out.getvalue()
    assert "push layer 0" in shown
    # The last thing written moves back up over the bar and erases its line.
    assert shown.rstrip("\r\n").endswith("\x1b[1A\x1b[2K")


def test_a_success_leaves_the_bars_on_the_terminal() -> None:
    out = io.StringIO()
    _run(Console(file=out, force_terminal=True, width=80), False)
    assert "push layer 0" in out.getvalue()
    assert not out.getvalue().rstrip("\r\n").endswith("\x1b[2K")
