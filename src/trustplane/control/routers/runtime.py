"""`POST /v1/runtime/drift`: a node found a running container's image files changed.

The node agent re-measures the image layers of each running container
against the registered file digests (agent/runtime.py). What it finds is
logged here (`runtime.drift`, with the node's name from its token, never
from the body) and the answer says what to do: `stop` when the policy's
`runtime.stop_on_drift` names the image, else `keep`. A container that
could not be measured at all is reported the same way (fail closed), with
the reason.

A drift the policy only reports is found again at every round. The agent
sends what it found each time (the policy may have changed its answer),
and with it `repeat_of`, the index of the entry that logged the same
finding; when that entry is this node's `runtime.drift` with exactly this
content, container and answer, nothing new is logged and the answer names
that entry (`repeated`). Anything else is logged as new: one entry per
change of what was found or of the answer, whatever the node claims.

Only principals with role `node` may report. The body is bounded: at most
MAX_PATHS paths per list (the counts say how many there were in all).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import anyio.to_thread
from fastapi import APIRouter, status

from trustplane.api.runtime import DriftAnswer, DriftReport
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden, NotFoundError
from trustplane.oci.reference import repository_name

router = APIRouter(prefix="/v1", tags=["runtime"])


@router.post("/runtime/drift", status_code=status.HTTP_201_CREATED, response_model=DriftAnswer)
async def drift(body: DriftReport, caller: Caller, plane: Plane) -> DriftAnswer:
    """Log a container's drift from its registered image files; say whether to stop it."""
    if caller.role != "node":
        raise Forbidden("only nodes report runtime drift")
    repository = repository_name(body.repository)
    stop = plane.policy.current().stops_on_drift(repository)
    reason = (
        "policy runtime.stop_on_drift names this image"
        if stop
        else "policy does not ask to stop on drift"
    )
    action: Literal["stop", "keep"] = "stop" if stop else "keep"
    entry: dict[str, Any] = {
        "node": caller.subject,
        "container": body.container,
        "name": body.name,
        "image": repository,
        "manifest": body.manifest_digest,
        "changed": body.changed,
        "missing": body.missing,
        "unexpected": body.unexpected,
        "counts": body.counts.model_dump(),
        "unmeasured": body.reason,
        "fingerprint": body.fingerprint,
        "action": action,
    }
    if body.repeat_of is not None and body.fingerprint is not None:
        logged = await anyio.to_thread.run_sync(_logged_drift, plane, body.repeat_of)
        if logged == entry:
            return DriftAnswer(
                action=action, reason=reason, log_index=body.repeat_of, repeated=True
            )
    receipt = await plane.log.append_async("runtime.drift", entry)
    return DriftAnswer(action=action, reason=reason, log_index=receipt.index)


def _logged_drift(plane: Plane, index: int) -> dict[str, Any] | None:
    """The content of log entry `index` when it is a runtime.drift entry, else None."""
    try:
        logged = json.loads(plane.log.entry(index))
    except NotFoundError:
        return None
    if not isinstance(logged, dict) or logged.pop("kind", None) != "runtime.drift":
        return None
    logged.pop("time", None)
    return logged
