"""Prove a volume is encrypted: its raw storage against its record and its type.

`verify_encryption` reads the raw (encrypted) bytes the way the storage
side reaches them (`Backend.reader`) and checks, each check named:

- `luks-header`: the storage starts with a LUKS header that parses;
- `header-uuid`, `header-digest`: its UUID and the SHA-256 of the whole
  header area are the ones the record kept at create (a volume replaced or
  re-formatted behind the service's back fails here);
- `cipher`: the header's cipher and master-key size are the volume type's;
- `payload`: sectors sampled evenly over the payload area are not
  plaintext-like.

The payload test is statistical and says what it can and cannot see. A
LUKS sector written through the encryptor is AES-XTS ciphertext:
indistinguishable from random, so its byte entropy over 4 KiB is close to
8 bits. Plaintext (text, code, filesystem metadata, zeros written in the
clear) is far below. Compressed or already-encrypted plaintext written
around the encryption would look like ciphertext: this check cannot tell
those apart, nor see plaintext between the samples. A sector never written
reads as zeros on thin storage; on a file (the only backend whose holes this
host can see, `FileRawReader.unwritten`) a zero sector in a hole counts as
unwritten and one in allocated space as plaintext (QEMU's LUKS driver never
writes all-zero ciphertext: its odds are 2^-32768). Where holes cannot be
seen (storage reached through QEMU), an all-zero sample counts as unwritten.
"""

from __future__ import annotations

import hmac
import math
from collections import Counter

from trustplane.api.volume_spec import EncryptionSpec
from trustplane.api.volumes import (
    CheckName,
    HeaderFingerprint,
    PayloadSamples,
    VerificationCheck,
)
from trustplane.errors import MalformedError, UsageError
from trustplane.volumes.access import FileRawReader
from trustplane.volumes.header import SECTOR, LuksHeader, RawReader, parse_header

SAMPLE_BYTES = 4096
"""One sample: 8 LUKS sectors, enough for a byte histogram (16 expected per value)."""
DEFAULT_SAMPLES = 32
MAX_SAMPLES = 4096
ENTROPY_THRESHOLD = 7.8
"""Bits per byte a sample must reach to count as ciphertext.

The plug-in entropy estimate of 4096 uniformly random bytes is
8 - 255/(2·4096·ln 2) ≈ 7.955 bits with a standard deviation of about
0.004 (Miller–Madow bias; 256 values, 16 expected each), so AES-XTS
ciphertext falls under 7.8 with odds far below 1 in 10^100: no false alarm.
English text and source code stay under 5, base64 under 6, x86 code and
filesystem metadata under 7, zeros at 0: each fails.
"""


def byte_entropy(data: bytes) -> float:
    """Shannon entropy of the byte distribution of `data`, in bits per byte."""
    if not data:
        return 0.0
    total = len(data)
    return -sum(n / total * math.log2(n / total) for n in Counter(data).values())


def sample_offsets(start: int, size: int, count: int) -> list[int]:
    """`count` sector-aligned offsets spread evenly over [start, start + size)."""
    if not 1 <= count <= MAX_SAMPLES:
        raise UsageError(f"samples is between 1 and {MAX_SAMPLES}, not {count}")
    last = max(size - SAMPLE_BYTES, 0)
    count = max(min(count, size // SAMPLE_BYTES), 1)
    if count == 1:
        return [start]
    return [start + (last * i // (count - 1)) // SECTOR * SECTOR for i in range(count)]


def sample_payload(reader: RawReader, start: int, size: int, count: int) -> PayloadSamples:
    """Classify `count` samples of the payload area [start, start + size)."""
    ciphertext = unwritten = plaintext = short = 0
    lowest: float | None = None
    offsets = sample_offsets(start, size, count)
    for offset in offsets:
        data = reader.read(offset, SAMPLE_BYTES)
        if len(data) < SAMPLE_BYTES:
            short += 1
            continue
        if not any(data):
            if isinstance(reader, FileRawReader) and not reader.unwritten(offset, SAMPLE_BYTES):
                plaintext += 1  # zeros written in the clear
                lowest = 0.0
            else:
                unwritten += 1
            continue
        entropy = byte_entropy(data)
        lowest = entropy if lowest is None else min(lowest, entropy)
        if entropy >= ENTROPY_THRESHOLD:
            ciphertext += 1
        else:
            plaintext += 1
    return PayloadSamples(
        sampled=len(offsets),
        sample_bytes=SAMPLE_BYTES,
        ciphertext=ciphertext,
        unwritten=unwritten,
        plaintext=plaintext,
        short=short,
        min_entropy=None if lowest is None else round(lowest, 3),
        threshold=ENTROPY_THRESHOLD,
    )


def verify_encryption(
    reader: RawReader,
    expected: HeaderFingerprint,
    spec: EncryptionSpec,
    size: int,
    samples: int = DEFAULT_SAMPLES,
) -> tuple[list[VerificationCheck], PayloadSamples]:
    """Every check, passed or not (nothing raised for a failed one), and the samples."""
    checks: list[VerificationCheck] = []

    def check(name: CheckName, passed: bool, detail: str) -> None:
        checks.append(VerificationCheck(name=name, passed=passed, detail=detail))

    header: LuksHeader | None = None
    try:
        header = parse_header(reader)
    except MalformedError as exc:
        check("luks-header", False, str(exc))
    if header is None:
        names: tuple[CheckName, ...] = ("header-uuid", "header-digest", "cipher")
        for name in names:
            check(name, False, "no LUKS header to check")
    else:
        check("luks-header", True, f"LUKS{header.version}, payload at byte {header.data_offset}")
        same_uuid = header.uuid == expected.uuid
        check(
            "header-uuid",
            same_uuid,
            header.uuid if same_uuid else f"{header.uuid} (record: {expected.uuid})",
        )
        digest = "sha256:" + reader.digest(header.data_offset)
        same = hmac.compare_digest(digest, expected.digest)
        same = same and header.data_offset == expected.header_bytes
        check(
            "header-digest",
            same,
            digest
            if same
            else f"{digest} over {header.data_offset} bytes "
            f"(record: {expected.digest} over {expected.header_bytes})",
        )
        key_bits = header.key_bytes * 8
        right = header.cipher == spec.cipher and key_bits == spec.key_size
        check(
            "cipher",
            right,
            f"{header.cipher} {key_bits}-bit"
            + ("" if right else f" (the type's: {spec.cipher} {spec.key_size}-bit)"),
        )
    start = header.data_offset if header is not None else expected.header_bytes
    payload = sample_payload(reader, start, size, samples)
    detail = (
        f"{payload.sampled} samples of {payload.sample_bytes} bytes: {payload.ciphertext} "
        f"ciphertext-like, {payload.unwritten} unwritten, {payload.plaintext} plaintext-like"
    )
    if payload.short:
        detail += f", {payload.short} past the end of the storage"
    if payload.min_entropy is not None:
        detail += f"; lowest entropy {payload.min_entropy} bits/byte"
    detail += f" (threshold {payload.threshold})"
    check("payload", payload.plaintext == 0 and payload.short == 0, detail)
    return checks, payload
