"""Image registration: which plain layer digests sit at which index, and their files."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from trustplane.api.fields import DIGEST
from trustplane.trust.file_digests import VALUE, is_reference_path

MAX_FILES = 500_000
"""Files per layer a registration may describe (a full distribution has ~100k)."""


class LayerRecord(BaseModel):
    index: int = Field(ge=0, le=2**31 - 1)
    digest: str = Field(pattern=DIGEST, description="Digest of the plain (unencrypted) blob")
    encrypted: bool
    diff_id: str | None = Field(None, pattern=DIGEST)


class PublishedLayer(LayerRecord):
    files: dict[str, str] | None = Field(
        None,
        max_length=MAX_FILES,
        description="Runtime-integrity reference: absolute path -> sha256:HEX, "
        "symlink:TARGET, whiteout, fifo, char:MAJ:MIN or block:MAJ:MIN",
    )

    @field_validator("files")
    @classmethod
    def reference_map(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for path, item in (value or {}).items():
            if not is_reference_path(path):
                raise ValueError(f"file path {path[:100]!r} is not absolute and normal")
            if not VALUE.fullmatch(item):
                raise ValueError(f"file {path[:100]!r} has an unknown reference value")
        return value


class ImageRecord(BaseModel):
    repository: str = Field(min_length=1, max_length=256)
    manifest_digest: str = Field(pattern=DIGEST)
    layers: list[PublishedLayer] = Field(max_length=1024)

    @field_validator("layers")
    @classmethod
    def distinct(cls, value: list[PublishedLayer]) -> list[PublishedLayer]:
        if len({layer.index for layer in value}) != len(value):
            raise ValueError("layer indexes must be distinct")
        return value


class Registered(BaseModel):
    log_index: int


class ImageEntry(BaseModel):
    repository: str
    manifest_digest: str
    layers: list[LayerRecord]
    publisher: str


class LayerFilesEntry(BaseModel):
    index: int
    digest: str
    diff_id: str | None
    files: dict[str, str] | None
    """None: no file digests were registered for this layer."""


class ImageFiles(BaseModel):
    repository: str
    manifest_digest: str
    layers: list[LayerFilesEntry]
