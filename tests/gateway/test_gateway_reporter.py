"""The reporter never holds up a refusal: a bounded queue, a background sender, retries."""

from __future__ import annotations

import asyncio
import inspect

from trustplane.api.reports import Report
from trustplane.errors import UnavailableError
from trustplane.gateway.reporter import Reporter


class HangingPlane:
    """A control plane that takes a batch and answers nothing until `release` is set,
    then fails that batch once (as a plane that times out) and takes the rest."""

    def __init__(self) -> None:
        self.batches: list[list[Report]] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.failed = False

    async def report(self, reports: list[Report]) -> list[int]:
        self.entered.set()
        await self.release.wait()
        if not self.failed:
            self.failed = True
            raise UnavailableError("down")
        self.batches.append(list(reports))
        return list(range(len(reports)))


def test_reports_are_queued_without_waiting_and_sent_when_the_plane_answers() -> None:
    # report() is a plain function: a refusal that reports cannot await the plane.
    assert not inspect.iscoroutinefunction(Reporter.report)

    async def scenario() -> None:
        plane = HangingPlane()
        reporter = Reporter(plane, queue_size=50)
        reporter.start()
        reporter.report("gateway.decision", {"decision": "deny", "n": -1, "reason": "first"})
        await plane.entered.wait()  # the sender now hangs inside the control plane
        for i in range(200):  # meanwhile nothing waits; past the queue's size, reports drop
            reporter.report("gateway.decision", {"decision": "deny", "n": i, "reason": "x" * 5000})
        # Every call above returned while the plane was still hanging (release never set).
        assert not plane.release.is_set()
        assert plane.batches == []
        assert reporter.dropped == 150
        plane.release.set()
        await reporter.flush(60)
        sent = [report for batch in plane.batches for report in batch]
        decisions = [r for r in sent if r.kind == "gateway.decision"]
        assert [r.details["n"] for r in decisions] == [-1, *range(50)]  # retried, in order
        assert all(len(str(r.details["reason"])) <= 1000 for r in decisions)
        dropped = [r for r in sent if r.kind == "gateway.status"]
        assert dropped
        assert dropped[0].details["dropped"] == reporter.dropped
        assert all(len(batch) <= 100 for batch in plane.batches)
        await reporter.close()

    asyncio.run(scenario())
