"""C2SP signed notes (c2sp.org/signed-note) with Ed25519 keys.

A note is UTF-8 text ending in a newline, a blank line, then one or more
lines `— <key name> <base64(4-byte key ID || signature)>`. The key ID is
SHA-256(name || 0x0A || 0x01 || 32-byte public key)[:4]; a verifier key is
written `<name>+<hex key ID>+<base64(0x01 || public key)>` and a signer key
`PRIVATE+KEY+<name>+<hex key ID>+<base64(0x01 || seed)>`, the forms of
golang.org/x/mod/sumdb/note, so keys and notes interoperate with the Go
tools (sum.golang.org, transparency-dev witnesses).

Parsing is strict: canonical base64 only, every signature from a known key
is verified and one bad signature rejects the whole note (the spec's SHOULD;
the Go package skips repeats of a key without checking them). Signatures of
unknown keys are ignored, as the spec requires, so witnesses can cosign.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trustplane.errors import IntegrityError, MalformedError, UsageError

ALG_ED25519 = 0x01
MAX_SIGNATURES = 100
"""The Go package's limit; the spec asks verifiers to accept at least 16."""
MAX_NOTE_BYTES = 1 << 20
"""Far above a checkpoint with 100 post-quantum cosignatures (about 5 KiB each)."""

_SIG_PREFIX = "— "  # em dash, space
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_FORBIDDEN = re.compile(r"[\x00-\x09\x0b-\x1f\ud800-\udfff]")


def b64decode_strict(text: str) -> bytes | None:
    """Standard base64 in its one canonical spelling, else None (no lenient decoding)."""
    if not text.isascii():
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def check_text(text: str) -> bool:
    """The signed-note character rule: no ASCII control characters other than newline.

    Lone surrogates are refused too: they cannot be encoded as UTF-8.
    """
    return _FORBIDDEN.search(text) is None


def valid_key_name(name: str) -> bool:
    """Non-empty, no Unicode space, no '+', no control characters."""
    return (
        bool(name) and "+" not in name and not any(c.isspace() for c in name) and check_text(name)
    )


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """SHA-256(name || 0x0A || 0x01 || public key)[:4]."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + raw).digest()[:4]


@dataclass(frozen=True)
class NoteVerifier:
    """A trusted Ed25519 note key: name, 4-byte key ID, public key."""

    name: str
    key_id: bytes
    public_key: Ed25519PublicKey

    @classmethod
    def for_key(cls, name: str, public_key: Ed25519PublicKey) -> NoteVerifier:
        """The verifier of `public_key` under `name`, its key ID computed."""
        if not valid_key_name(name):
            raise UsageError(f"{name!r} is not a valid note key name")
        return cls(name, key_id(name, public_key), public_key)

    def verifier_key(self) -> str:
        """`name+hex(key ID)+base64(0x01 || public key)`."""
        raw = self.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        encoded = base64.b64encode(bytes([ALG_ED25519]) + raw).decode("ascii")
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    def verify(self, text: bytes, signature: bytes) -> bool:
        """True if `signature` (without the key ID) is this key's over `text`."""
        try:
            self.public_key.verify(signature, text)
        except InvalidSignature:
            return False
        return True


class NoteSigner:
    """An Ed25519 note signing key under a key name (the log's origin, by convention)."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.verifier = NoteVerifier.for_key(name, private_key.public_key())

    @property
    def name(self) -> str:
        """The key name written in signature lines."""
        return self.verifier.name

    @property
    def key_id(self) -> bytes:
        """The 4-byte key ID written before each signature."""
        return self.verifier.key_id

    def verifier_key(self) -> str:
        """The public verifier key string to hand to clients."""
        return self.verifier.verifier_key()

    def signature_line(self, text: bytes) -> str:
        """`— <name> <base64(key ID || Ed25519 signature over text)>` with its newline."""
        signature = self.key_id + self._private_key.sign(text)
        return f"{_SIG_PREFIX}{self.name} {base64.b64encode(signature).decode('ascii')}\n"


def _split_key(text: str, parts: int) -> list[str] | None:
    fields = text.split("+", parts - 1)
    return fields if len(fields) == parts else None


def parse_verifier_key(text: str) -> NoteVerifier:
    """Read `name+hex(key ID)+base64(0x01 || 32-byte key)`; `MalformedError` if anything is off.

    The key ID must match the name and key, as in the Go package, so a key
    string with a typo is refused instead of never matching a signature. No
    whitespace is stripped: a caller reading a key file strips it.
    """
    fields = _split_key(text, 3)
    if fields is None:
        raise MalformedError("a note verifier key is name+keyid+key")
    name, hex_id, encoded = fields
    key = b64decode_strict(encoded)
    if not valid_key_name(name) or not _HEX8.fullmatch(hex_id) or not key:
        raise MalformedError("malformed note verifier key")
    if key[0] != ALG_ED25519 or len(key) != 33:
        raise MalformedError("the note verifier key is not an Ed25519 key")
    try:
        public_key = Ed25519PublicKey.from_public_bytes(key[1:])
    except ValueError:
        raise MalformedError("the note verifier key is not an Ed25519 key") from None
    verifier = NoteVerifier.for_key(name, public_key)
    if verifier.key_id != bytes.fromhex(hex_id):
        raise MalformedError("the note verifier key's ID does not match its name and key")
    return verifier


def parse_signer_key(text: str) -> NoteSigner:
    """Read `PRIVATE+KEY+name+hex(key ID)+base64(0x01 || 32-byte seed)` (Go's note.NewSigner)."""
    fields = _split_key(text, 5)
    if fields is None or fields[0] != "PRIVATE" or fields[1] != "KEY":
        raise MalformedError("a note signer key is PRIVATE+KEY+name+keyid+key")
    _, _, name, hex_id, encoded = fields
    key = b64decode_strict(encoded)
    if not valid_key_name(name) or not _HEX8.fullmatch(hex_id) or not key:
        raise MalformedError("malformed note signer key")
    if key[0] != ALG_ED25519 or len(key) != 33:
        raise MalformedError("the note signer key is not an Ed25519 key")
    signer = NoteSigner(name, Ed25519PrivateKey.from_private_bytes(key[1:]))
    if signer.key_id != bytes.fromhex(hex_id):
        raise MalformedError("the note signer key's ID does not match its name and key")
    return signer


def sign_note(text: bytes, *signers: NoteSigner) -> bytes:
    """`text`, a blank line, and one signature line per signer."""
    if not signers:
        raise UsageError("a note needs at least one signer")
    _check_note_text(text)
    return text + b"\n" + "".join(s.signature_line(text) for s in signers).encode()


def _check_note_text(text: bytes) -> str:
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError("note text is not UTF-8") from None
    if not decoded.endswith("\n") or not check_text(decoded):
        raise MalformedError("note text must end in a newline and hold no control characters")
    return decoded


@dataclass(frozen=True)
class OpenedNote:
    """A note whose signatures checked out: its text and the known keys that signed it."""

    text: bytes
    signed_by: tuple[NoteVerifier, ...]


def open_note(note: bytes, verifiers: Sequence[NoteVerifier]) -> OpenedNote:
    """Parse `note` and verify it against `verifiers`.

    `MalformedError` for a note that breaks the format; `IntegrityError` if a
    signature of a known key fails or no known key signed. Signatures from
    keys not in `verifiers` (same name or same ID, but not both) are ignored.
    """
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for v in verifiers:
        other = known.setdefault((v.name, v.key_id), v)
        if other.public_key.public_bytes_raw() != v.public_key.public_bytes_raw():
            raise UsageError(f"two verifier keys share the name and ID {v.name}+{v.key_id.hex()}")
    if len(note) > MAX_NOTE_BYTES:
        raise MalformedError("signed note is too large")
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError("signed note is not UTF-8") from None
    if not check_text(decoded):
        raise MalformedError("signed note holds control characters")
    split = decoded.rfind("\n\n")
    if split < 0:
        raise MalformedError("signed note has no blank line before its signatures")
    text, block = decoded[: split + 1], decoded[split + 2 :]
    if not block.endswith("\n"):
        raise MalformedError("signed note must end with a signature line and a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedError("signed note has too many signatures")
    text_bytes = text.encode("utf-8")
    signed_by: dict[tuple[str, bytes], NoteVerifier] = {}
    for line in lines:
        if not line.startswith(_SIG_PREFIX):
            raise MalformedError("signed note has a line that is not a signature")
        name, sep, encoded = line[len(_SIG_PREFIX) :].partition(" ")
        signature = b64decode_strict(encoded)
        if not sep or not valid_key_name(name) or signature is None or len(signature) < 5:
            raise MalformedError("signed note has a malformed signature line")
        verifier = known.get((name, signature[:4]))
        if verifier is None:
            continue
        if not verifier.verify(text_bytes, signature[4:]):
            raise IntegrityError(
                f"invalid signature for key {name}+{signature[:4].hex()} on the signed note"
            )
        signed_by[(name, signature[:4])] = verifier
    if not signed_by:
        raise IntegrityError("the signed note carries no signature from a trusted key")
    return OpenedNote(text_bytes, tuple(signed_by.values()))
