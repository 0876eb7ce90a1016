"""Progress bars (rich) for long operations, silent for small ones.

Bars go to stderr so that `--json` output on stdout stays clean, and only
appear on a terminal, for transfers over `THRESHOLD` bytes. When the
operation fails they are cleared: its error is one line on stderr.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

THRESHOLD = 4 << 20
Advance = Callable[[int], object]


def _ignore(_: int) -> None:
    return None


class Reporter:
    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            if exc_type is not None:  # a failure is one line on stderr: the bars go
                self._progress.live.transient = True
            self._progress.stop()
            self._progress = None

    def bar(self, description: str, total: int) -> Advance:
        """A callback that advances a new bar by the bytes it is given."""
        if not self.enabled or total < THRESHOLD or not self.console.is_terminal:
            return _ignore
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
        progress = self._progress
        task = progress.add_task(description, total=total)
        return lambda n: progress.advance(task, n)


SILENT = Reporter(enabled=False)
