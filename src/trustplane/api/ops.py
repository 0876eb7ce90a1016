"""Health: public, and free of anything secret."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = Field(description="ok, or degraded (see log_error)")
    log_size: int
    log_error: str | None = Field(
        None, description="The transparency log's entries contradict its stored tree"
    )
    kek: str
    policy_error: str | None
