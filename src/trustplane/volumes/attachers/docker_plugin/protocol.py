"""Docker's volume plugin protocol: request and answer bodies.

Docker Engine's "Volume plugin protocol" (docs/extend/plugins_volume.md of
docker/cli): every call is a POST with a JSON body; every answer carries
`Err` (empty on success). The names on the wire are Docker's (`Name`,
`Mountpoint`, ...); the fields here are snake case with those aliases.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
DRIVER_NAME = "trustplane"


class _Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Activated(_Wire):
    implements: list[str] = Field(default=["VolumeDriver"], alias="Implements")


class CreateRequest(_Wire):
    name: str = Field(alias="Name")
    opts: dict[str, str] | None = Field(default=None, alias="Opts")


class NameRequest(_Wire):
    """Remove, Path and Get."""

    name: str = Field(alias="Name")


class MountRequest(_Wire):
    """Mount and Unmount: `ID` names the caller (one per container mount)."""

    name: str = Field(alias="Name")
    id: str = Field(default="", alias="ID")


class Answer(_Wire):
    err: str = Field(default="", alias="Err")


class MountAnswer(Answer):
    mountpoint: str = Field(default="", alias="Mountpoint")


class VolumeView(_Wire):
    name: str = Field(alias="Name")
    mountpoint: str = Field(default="", alias="Mountpoint")
    status: dict[str, str | int] = Field(default_factory=dict, alias="Status")


class GetAnswer(Answer):
    volume: VolumeView | None = Field(default=None, alias="Volume")


class ListAnswer(Answer):
    volumes: list[VolumeView] = Field(default_factory=list, alias="Volumes")


class Capabilities(_Wire):
    scope: Literal["global", "local"] = Field(default="global", alias="Scope")


class CapabilitiesAnswer(_Wire):
    capabilities: Capabilities = Field(default_factory=Capabilities, alias="Capabilities")
