"""LUKS headers: recognise one, read its UUID and layout, fingerprint it.

The block-storage service stores a volume's header fingerprint (the LUKS
UUID and a SHA-256 of the whole header area, from byte 0 to the start of
the encrypted payload: binary header, key-slot descriptors or JSON
metadata, and key material). Attach recomputes it from the raw volume
before anything else happens; a volume replaced or re-formatted behind the
service's back has a new UUID, new salts and a new master-key digest, so it
is refused (`IntegrityError`) before libvirt or QEMU is touched.

Parsed by hand from the on-disk format specifications (LUKS1: "LUKS On-Disk
Format Specification" 1.2.3; LUKS2: "LUKS2 On-Disk Format Specification"
1.1.x): a fixed binary header, and for LUKS2 its JSON area. No library reads
a header without opening the device (libcryptsetup needs device-mapper and
root for much of it), and the fields needed are a few fixed offsets.
"""

from __future__ import annotations

import hmac
import json
import struct
from dataclasses import dataclass
from typing import Literal, Protocol

from trustplane.api.volumes import HeaderFingerprint
from trustplane.errors import IntegrityError, MalformedError

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS2_SECONDARY_MAGIC = b"SKUL\xba\xbe"
SECTOR = 512
PROBE_BYTES = 4096
"""Enough to recognise a header and read the LUKS1 fields or LUKS2's binary header."""
_MAX_LUKS2_HEADER = 4 << 20
_MAX_DATA_OFFSET = 1 << 30


class RawReader(Protocol):
    """Reads a volume's raw (encrypted) bytes the way its consumer reaches them."""

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (short only at the end of the volume)."""

    def digest(self, length: int) -> str:
        """SHA-256 (hex) of the first `length` bytes, read without holding them in memory."""


@dataclass(frozen=True)
class LuksHeader:
    """What a LUKS header says about its volume."""

    version: int
    uuid: str
    cipher: str
    """`aes-xts-plain64` style: cipher name and mode joined."""
    key_bytes: int
    """Master key length (0 when a LUKS2 header has no key slot)."""
    data_offset: int
    """Byte offset of the encrypted payload: the end of the header area."""
    sector_size: int = SECTOR


def is_luks(first_bytes: bytes) -> bool:
    """True when a volume starts with a LUKS header (either version)."""
    return first_bytes.startswith(LUKS_MAGIC)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def parse_header(reader: RawReader, first: bytes | None = None) -> LuksHeader:
    """Parse the LUKS header at the start of the volume `reader` reads.

    MalformedError when there is none or it does not hold together.
    """
    first = first if first is not None else reader.read(0, PROBE_BYTES)
    if not is_luks(first):
        raise MalformedError("the volume has no LUKS header")
    if len(first) < PROBE_BYTES:
        raise MalformedError("the volume is shorter than a LUKS header")
    (version,) = struct.unpack(">H", first[6:8])
    uuid = _text(first[168:208])
    if version == 1:
        cipher = f"{_text(first[8:40])}-{_text(first[40:72])}"
        payload_sectors, key_bytes = struct.unpack(">II", first[104:112])
        offset = payload_sectors * SECTOR
        if not 0 < offset <= _MAX_DATA_OFFSET:
            raise MalformedError(f"LUKS1 header with payload offset {payload_sectors} sectors")
        return LuksHeader(1, uuid, cipher, key_bytes, offset)
    if version == 2:
        return _parse_luks2(reader, first, uuid)
    raise MalformedError(f"LUKS version {version} is unknown")


def _parse_luks2(reader: RawReader, first: bytes, uuid: str) -> LuksHeader:
    (header_size,) = struct.unpack(">Q", first[8:16])
    if not PROBE_BYTES < header_size <= _MAX_LUKS2_HEADER:
        raise MalformedError(f"LUKS2 header size {header_size} is out of range")
    area = reader.read(PROBE_BYTES, header_size - PROBE_BYTES)
    try:
        metadata = json.loads(area.split(b"\0", 1)[0])
        segments = metadata["segments"]
        segment = min(segments.values(), key=lambda s: int(s["offset"]))
        offset = int(segment["offset"])
        cipher = str(segment["encryption"])
        sector_size = int(segment.get("sector_size", SECTOR))
        key_bytes = max(
            (int(slot.get("key_size", 0)) for slot in metadata.get("keyslots", {}).values()),
            default=0,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedError(f"LUKS2 JSON metadata is unreadable ({exc})") from None
    if not 0 < offset <= _MAX_DATA_OFFSET:
        raise MalformedError(f"LUKS2 data segment at offset {offset}")
    return LuksHeader(2, uuid, cipher, key_bytes, offset, sector_size)


def fingerprint(reader: RawReader) -> HeaderFingerprint:
    """The fingerprint of the volume's LUKS header (MalformedError if it has none)."""
    header = parse_header(reader)
    version: Literal[1, 2] = 1 if header.version == 1 else 2
    return HeaderFingerprint(
        version=version,
        uuid=header.uuid,
        digest="sha256:" + reader.digest(header.data_offset),
        header_bytes=header.data_offset,
        cipher=header.cipher,
        key_size=header.key_bytes * 8,
    )


def verify(reader: RawReader, expected: HeaderFingerprint, what: str) -> HeaderFingerprint:
    """Refuse (IntegrityError, one line) a volume whose header is not the recorded one."""
    try:
        actual = fingerprint(reader)
    except MalformedError as exc:
        raise IntegrityError(f"{what}: {exc}; it was replaced or wiped, refused") from None
    if actual.uuid != expected.uuid:
        raise IntegrityError(
            f"{what}: LUKS header UUID {actual.uuid} is not the recorded {expected.uuid}; "
            "the volume was replaced or re-formatted, refused"
        )
    same = hmac.compare_digest(actual.digest, expected.digest)
    if not same or actual.header_bytes != expected.header_bytes:
        raise IntegrityError(
            f"{what}: LUKS header {actual.uuid} differs from the recorded one (digest); "
            "the volume was re-formatted or tampered with, refused"
        )
    return actual
