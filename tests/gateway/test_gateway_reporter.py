"""The reporter never holds up a refusal: a bounded queue, a background sender, retries."""

from __future__ import annotations

import asyncio
import time

from trustplane.api.reports import Report
from trustplane.errors import UnavailableError
from trustplane.gateway.reporter import Reporter


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[Report]] = []
        self.failing = True
        self.hang = asyncio.Event()

    async def report(self, reports: list[Report]) -> list[int]:
        if self.failing:
            await asyncio.wait_for(self.hang.wait(), 0.05)  # a control plane that hangs
            raise UnavailableError("down")
        self.batches.append(list(reports))
        return list(range(len(reports)))


def test_reports_are_queued_without_waiting_and_sent_when_the_plane_answers() -> None:
    async def scenario() -> None:
        sink = Sink()
        reporter = Reporter(sink, queue_size=50)
        reporter.start()
        began = time.perf_counter()
        for i in range(200):  # the plane is down: nothing waits, extra reports are dropped
            reporter.report("gateway.decision", {"decision": "deny", "n": i, "reason": "x" * 5000})
        assert time.perf_counter() - began < 0.05
        assert reporter.dropped >= 149
        await asyncio.sleep(0.3)
        sink.failing = False
        await reporter.flush(10)
        sent = [report for batch in sink.batches for report in batch]
        decisions = [r for r in sent if r.kind == "gateway.decision"]
        assert 50 <= len(decisions) <= 51
        assert all(len(str(r.details["reason"])) <= 1000 for r in decisions)
        assert [r.details["n"] for r in decisions] == sorted(
            int(r.details["n"] or 0) for r in decisions
        )
        dropped = [r for r in sent if r.kind == "gateway.status"]
        assert dropped
        assert dropped[0].details["dropped"] == reporter.dropped
        assert all(len(batch) <= 100 for batch in sink.batches)
        await reporter.close()

    asyncio.run(scenario())
