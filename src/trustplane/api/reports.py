"""`POST /v1/reports`: a node's own decisions, monitor actions and status, for the log
(`volume.lease`: a volume opened with a leased key while the control plane was unreachable)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from trustplane.api.fields import Scalar, bounded_details

MAX_BATCH = 100
ReportKind = Literal["gateway.decision", "gateway.monitor", "gateway.status", "volume.lease"]


class Report(BaseModel):
    kind: ReportKind
    time: float = Field(ge=0, le=1e11, description="When the node saw it (Unix seconds)")
    details: dict[str, Scalar] = Field(default_factory=dict)

    @field_validator("details")
    @classmethod
    def bounded(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        return bounded_details(value, ("kind", "node", "time", "reported"))


class Reports(BaseModel):
    reports: list[Report] = Field(min_length=1, max_length=MAX_BATCH)


class ReportsLogged(BaseModel):
    log_indexes: list[int]
