"""The transparency log: its key, entries and proofs (the checkpoint is plain text)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class LogKey(BaseModel):
    origin: str
    verifier_key: str = Field(description="The note verifier key, name+hash+base64")


class LogEntry(BaseModel):
    index: int
    body: str = Field(description="The leaf's bytes, base64 (what the Merkle tree hashes)")
    entry: dict[str, Any] = Field(description="The same bytes, parsed")


class InclusionProof(BaseModel):
    index: int
    size: int
    proof: list[str] = Field(description="Hashes, base64 (RFC 9162)")


class ConsistencyProof(BaseModel):
    old: int
    new: int
    proof: list[str] = Field(description="Hashes, base64 (RFC 9162)")
