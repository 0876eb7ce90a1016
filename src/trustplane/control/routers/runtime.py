"""`POST /v1/runtime/drift`: a node found a running container's image files changed.

The node agent re-measures the image layers of each running container
against the registered file digests (agent/runtime.py). What it finds is
logged here (`runtime.drift`, with the node's name from its token, never
from the body) and the answer says what to do: `stop` when the policy's
`runtime.stop_on_drift` names the image, else `keep`. A container that
could not be measured at all is reported the same way (fail closed), with
the reason.

Only principals with role `node` may report. The body is bounded: at most
MAX_PATHS paths per list (the counts say how many there were in all).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, Field, model_validator

from trustplane.control.routers.deps import Caller, Plane
from trustplane.control.routers.images import DIGEST
from trustplane.errors import Forbidden

router = APIRouter(prefix="/v1", tags=["runtime"])

MAX_PATHS = 100


class DriftCounts(BaseModel):
    changed: int = Field(ge=0, le=10**9)
    missing: int = Field(ge=0, le=10**9)
    unexpected: int = Field(ge=0, le=10**9)


class DriftReport(BaseModel):
    container: str = Field(pattern=r"^[a-f0-9]{12,64}$", description="Docker container id")
    name: str | None = Field(None, max_length=256, pattern=r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
    repository: str = Field(min_length=1, max_length=256, pattern=r"^[!-~]+$")
    manifest_digest: str = Field(pattern=DIGEST)
    changed: list[str] = Field(default_factory=list, max_length=MAX_PATHS)
    missing: list[str] = Field(default_factory=list, max_length=MAX_PATHS)
    unexpected: list[str] = Field(default_factory=list, max_length=MAX_PATHS)
    counts: DriftCounts
    reason: str | None = Field(
        None, max_length=1024, description="Why the container could not be measured"
    )

    @model_validator(mode="after")
    def consistent(self) -> DriftReport:
        for kind in ("changed", "missing", "unexpected"):
            paths: list[str] = getattr(self, kind)
            if any(not p.startswith("/") or len(p) > 4096 for p in paths):
                raise ValueError(f"{kind}: paths are absolute and at most 4096 characters")
            if len(paths) > getattr(self.counts, kind):
                raise ValueError(f"{kind}: more paths than counts.{kind}")
        total = self.counts.changed + self.counts.missing + self.counts.unexpected
        if total == 0 and self.reason is None:
            raise ValueError("a drift report names drifted files or the reason none could be")
        return self


class DriftAnswer(BaseModel):
    action: Literal["stop", "keep"]
    reason: str
    log_index: int


@router.post("/runtime/drift", status_code=status.HTTP_201_CREATED, response_model=DriftAnswer)
async def drift(body: DriftReport, caller: Caller, plane: Plane) -> DriftAnswer:
    """Log a container's drift from its registered image files; say whether to stop it."""
    if caller.role != "node":
        raise Forbidden("only nodes report runtime drift")
    stop = plane.policy.current().stops_on_drift(body.repository)
    reason = (
        "policy runtime.stop_on_drift names this image"
        if stop
        else "policy does not ask to stop on drift"
    )
    receipt = await plane.log.append_async(
        "runtime.drift",
        {
            "node": caller.subject,
            "container": body.container,
            "name": body.name,
            "image": body.repository,
            "manifest": body.manifest_digest,
            "changed": body.changed,
            "missing": body.missing,
            "unexpected": body.unexpected,
            "counts": body.counts.model_dump(),
            "unmeasured": body.reason,
            "action": "stop" if stop else "keep",
        },
    )
    return DriftAnswer(action="stop" if stop else "keep", reason=reason, log_index=receipt.index)
