"""`/v1/commands`: signed commands to gateways over MQTT, and the key that checks them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from trustplane.api.fields import Scalar

CommandName = Literal["pull", "start", "stop", "delete", "thresholds"]


class CommandKey(BaseModel):
    public_key: str


class CommandRequest(BaseModel):
    gateway: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    command: CommandName
    args: dict[str, Scalar] = Field(default_factory=dict, max_length=16)
    ttl: float = Field(default=60, gt=0, le=3600)


class CommandSent(BaseModel):
    envelope: str
    log_index: int
    published: bool
