"""`POST /v1/runtime/drift`: a running container's image files changed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from trustplane.api.fields import DIGEST

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
    fingerprint: str | None = Field(
        None,
        pattern=r"^[a-f0-9]{64}$",
        description="sha256 of everything found (every path, beyond the MAX_PATHS sent)",
    )
    repeat_of: int | None = Field(
        None, ge=0, description="The log entry of the same finding, sent at an earlier round"
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
    repeated: bool = Field(
        False, description="The same as the entry at log_index; nothing new was logged"
    )
