"""`POST /v1/reports`: what nodes saw and did, into the transparency log.

The control plane logs its own decisions (`/v1/authorize`); a gateway also
decides on its own: it refuses a caller of normal privilege, host access,
an unregistered image or a malformed request without asking, and its
resource monitor stops containers. Those reports come here, in batches, and
each becomes one log entry of its kind with the reporting node's name:

- `gateway.decision`: a refusal made at the gateway, with its reason;
- `gateway.monitor`: a measurement over threshold and the action taken;
- `gateway.status`: a gateway's periodic state (running containers, drops).

Only principals with role `node` may report, and only as themselves (the
node name is the caller's, never the body's). The body is bounded: at most
MAX_BATCH reports, each at most MAX_FIELDS flat fields of short scalars.
"""

from __future__ import annotations

import asyncio
import math
from typing import Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, Field, field_validator

from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden

router = APIRouter(prefix="/v1", tags=["reports"])

MAX_BATCH = 100
MAX_FIELDS = 32
MAX_TEXT = 1024
ReportKind = Literal["gateway.decision", "gateway.monitor", "gateway.status"]
Scalar = str | int | float | bool | None


class Report(BaseModel):
    kind: ReportKind
    time: float = Field(ge=0, le=1e11, description="When the node saw it (Unix seconds)")
    details: dict[str, Scalar] = Field(default_factory=dict)

    @field_validator("details")
    @classmethod
    def bounded(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        return bounded_details(value, ("kind", "node", "time", "reported"))


def bounded_details(value: dict[str, Scalar], reserved: tuple[str, ...] = ()) -> dict[str, Scalar]:
    """Flat, short, finite scalars under plain names: what may go into a log entry."""
    if len(value) > MAX_FIELDS:
        raise ValueError(f"at most {MAX_FIELDS} details")
    for key, item in value.items():
        if not key or len(key) > 64 or not key.replace("_", "").isalnum() or not key.isascii():
            raise ValueError("detail names are 1-64 letters, digits and underscores")
        if key in reserved:
            raise ValueError(f"detail name {key!r} is reserved")
        if isinstance(item, str) and len(item) > MAX_TEXT:
            raise ValueError(f"detail {key} is longer than {MAX_TEXT} characters")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"detail {key} is not a finite number")
    return value


class Reports(BaseModel):
    reports: list[Report] = Field(min_length=1, max_length=MAX_BATCH)


class Logged(BaseModel):
    log_indexes: list[int]


@router.post("/reports", status_code=status.HTTP_201_CREATED, response_model=Logged)
async def report(body: Reports, caller: Caller, plane: Plane) -> Logged:
    """Log a node's own decisions, monitor actions and status (nodes only)."""
    if caller.role != "node":
        raise Forbidden("only nodes report gateway decisions")
    # Queued together, the batch goes into one group commit.
    receipts = await asyncio.gather(
        *(
            plane.log.append_async(
                item.kind, {"node": caller.subject, "reported": item.time, **item.details}
            )
            for item in body.reports
        )
    )
    return Logged(log_indexes=[receipt.index for receipt in receipts])
