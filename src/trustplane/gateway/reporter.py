"""The gateway's own reports to the control plane's log, sent in the background.

A refusal is answered first and reported after: `report()` only puts the
report on a bounded queue and never waits, so a slow, failing or absent
control plane can neither delay a refusal nor turn it into an allow. A
sender task takes up to BATCH reports at a time and posts them to
`POST /v1/reports`; a failed batch is retried with backoff, and when the
queue is full new reports are dropped and counted, the count itself being
reported (`gateway.status`) once the control plane answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from trustplane.api.fields import Scalar
from trustplane.api.reports import Report, ReportKind
from trustplane.errors import TrustplaneError

QUEUE_SIZE = 10_000
BATCH = 100
RETRY_MIN = 0.5
RETRY_MAX = 30.0
MAX_TEXT = 1000
log = logging.getLogger("trustplane.gateway")


class ReportSink(Protocol):
    """Where reports go: ControlLink.report."""

    async def report(self, reports: list[Report]) -> list[int]: ...


class Reporter:
    def __init__(self, sink: ReportSink, queue_size: int = QUEUE_SIZE) -> None:
        self._sink = sink
        self._queue: asyncio.Queue[Report] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.sent = 0
        self._dropped_reported = 0

    @property
    def queued(self) -> int:
        """Reports waiting to be sent."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._send_forever())

    def report(self, kind: ReportKind, details: dict[str, Scalar]) -> None:
        """Queue one report; never blocks, never raises."""
        try:
            clean = {
                key: value[:MAX_TEXT] if isinstance(value, str) else value
                for key, value in details.items()
            }
            self._queue.put_nowait(
                Report.model_construct(kind=kind, time=time.time(), details=clean)
            )
        except asyncio.QueueFull:
            self.dropped += 1
        except Exception:  # a report must never break the decision it reports
            self.dropped += 1

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far was sent (tests, shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()

    async def close(self, timeout: float = 2.0) -> None:
        await self.flush(timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _send_forever(self) -> None:
        delay = RETRY_MIN
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            taken = len(batch)
            drops = None  # the drop count this batch reports, if any
            if self.dropped > self._dropped_reported and len(batch) < BATCH:
                drops = self.dropped
                batch.append(
                    Report.model_construct(
                        kind="gateway.status",
                        time=time.time(),
                        details={"event": "reports dropped", "dropped": drops},
                    )
                )
            while True:
                try:
                    await self._sink.report(batch)
                except (TrustplaneError, OSError) as exc:
                    log.warning("gateway: reports not sent (%s); retrying in %.1fs", exc, delay)
                except Exception:
                    log.exception("gateway: reports not sent; retrying in %.1fs", delay)
                else:
                    self.sent += len(batch)
                    # Only what this batch said: drops since then go in a later one.
                    if drops is not None:
                        self._dropped_reported = max(self._dropped_reported, drops)
                    delay = RETRY_MIN
                    break
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
            for _ in range(taken):
                self._queue.task_done()
