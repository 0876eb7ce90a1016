"""Signed tree heads in the C2SP tlog-checkpoint format (c2sp.org/tlog-checkpoint).

The body of the signed note is the origin line, the tree size in decimal,
the base64 root hash, then optional non-empty extension lines:

    example.com/behind-the-sofa
    20852163
    CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=

The same format as sum.golang.org and the transparency-dev witnesses, so a
trustplane log can be witnessed and checked with their tools. Opening a
checkpoint verifies the signature before the body is read, as the note
spec requires.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from trustplane.errors import IntegrityError, MalformedError
from trustplane.trust.merkle import HASH_SIZE
from trustplane.trust.note import (
    NoteSigner,
    NoteVerifier,
    b64decode_strict,
    check_text,
    open_note,
    parse_signer_key,
    parse_verifier_key,
    sign_note,
)

__all__ = [
    "Checkpoint",
    "NoteSigner",
    "NoteVerifier",
    "open_checkpoint",
    "parse_signer_key",
    "parse_verifier_key",
    "sign_checkpoint",
]

MAX_TREE_SIZE = (1 << 64) - 1
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


def _valid_line(line: str) -> bool:
    return bool(line) and "\n" not in line and check_text(line)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One tree head: which log (origin), how many leaves, and their Merkle root."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _valid_line(self.origin):
            raise MalformedError("checkpoint origin must be one non-empty line")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise MalformedError("checkpoint tree size out of range")
        if len(self.root) != HASH_SIZE:
            raise MalformedError("checkpoint root must be a 32-byte SHA-256 hash")
        if not all(_valid_line(e) for e in self.extensions):
            raise MalformedError("checkpoint extension lines must be non-empty single lines")

    def body(self) -> bytes:
        """The note text that gets signed."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii")]
        return "".join(line + "\n" for line in (*lines, *self.extensions)).encode("utf-8")

    @classmethod
    def parse(cls, text: bytes) -> Checkpoint:
        """Read a checkpoint body strictly; `MalformedError` for anything off.

        Strict means: a final newline, no blank line, a size without sign,
        spaces or leading zeros, and the root in canonical base64 of 32 bytes.
        """
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedError("checkpoint is not UTF-8") from None
        if not decoded.endswith("\n"):
            raise MalformedError("checkpoint must end in a newline")
        lines = decoded[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedError("checkpoint needs origin, size and root lines")
        origin, size_line, root_line, *extensions = lines
        if len(size_line) > 20 or not _DECIMAL.fullmatch(size_line):
            raise MalformedError("checkpoint tree size is not a plain decimal number")
        root = b64decode_strict(root_line)
        if root is None:
            raise MalformedError("checkpoint root is not canonical base64")
        return cls(origin, int(size_line), root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> bytes:
    """The checkpoint as a signed note, signed by `signer`."""
    return sign_note(checkpoint.body(), signer)


def open_checkpoint(note: bytes, verifier: NoteVerifier, origin: str) -> Checkpoint:
    """Verify `note` with `verifier` and return its checkpoint, which must be for `origin`.

    `IntegrityError` if the verifier's signature is missing or bad, or the
    origin is another log's; `MalformedError` if the note or its body breaks
    the formats. Other keys' signatures (witness cosignatures) are ignored.
    """
    opened = open_note(note, [verifier])
    checkpoint = Checkpoint.parse(opened.text)
    if checkpoint.origin != origin:
        raise IntegrityError(
            f"checkpoint is for log {checkpoint.origin!r}, not the expected {origin!r}"
        )
    return checkpoint
