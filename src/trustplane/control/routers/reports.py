"""`POST /v1/reports`: what nodes saw and did, into the transparency log.

The control plane logs its own decisions (`/v1/authorize`); a gateway also
decides on its own: it refuses a caller of normal privilege, host access,
an unregistered image or a malformed request without asking, and its
resource monitor stops containers. Those reports come here, in batches, and
each becomes one log entry of its kind with the reporting node's name:

- `gateway.decision`: a refusal made at the gateway, with its reason;
- `gateway.monitor`: a measurement over threshold and the action taken;
- `gateway.status`: a gateway's periodic state (running containers, drops).
- `volume.lease`: a volume the Docker volume plugin opened with a leased key
  while it could not reach the control plane (reported once it could).

Only principals with role `node` may report, and only as themselves (the
node name is the caller's, never the body's). The body is bounded: at most
MAX_BATCH reports, each at most MAX_FIELDS flat fields of short scalars.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, status

from trustplane.api.reports import Reports, ReportsLogged
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden

router = APIRouter(prefix="/v1", tags=["reports"])


@router.post("/reports", status_code=status.HTTP_201_CREATED, response_model=ReportsLogged)
async def report(body: Reports, caller: Caller, plane: Plane) -> ReportsLogged:
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
    return ReportsLogged(log_indexes=[receipt.index for receipt in receipts])
