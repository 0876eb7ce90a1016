"""`POST /v1/authorize`: the decision point gateways and agents ask."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from trustplane.api.fields import Scalar, bounded_details


class Subject(BaseModel):
    """Whom to decide for; gateways name the user they act for."""

    kind: Literal["user", "node"]
    name: str = Field(min_length=1, max_length=128)


class AuthorizeRequest(BaseModel):
    subject: Subject | None = Field(None, description="Default: the caller itself")
    action: str = Field(min_length=1, max_length=64)
    resource: str = Field(min_length=1, max_length=512)
    layer: int | None = Field(None, ge=0, description="For image layer keys: the layer index")
    context: dict[str, Scalar] | None = Field(
        None,
        description="What the asker knows of the resource (a gateway: the container's id, "
        "name, image, process id and resource use); logged with the decision, not decided on",
    )

    @field_validator("context")
    @classmethod
    def bounded(cls, value: dict[str, Scalar] | None) -> dict[str, Scalar] | None:
        return None if value is None else bounded_details(value)


class AuthorizeResponse(BaseModel):
    decision: Literal["allow", "deny"]
    reason: str
    log_index: int

    @property
    def allowed(self) -> bool:
        """Only an explicit allow is one."""
        return self.decision == "allow"
