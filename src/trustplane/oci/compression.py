"""Reading compressed layers: gzip, zstd or none, as the media type says."""

from __future__ import annotations

import gzip
import io
import zlib
from typing import IO, cast

import zstandard

DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
"""What reading corrupt compressed data raises (gzip.BadGzipFile is an OSError)."""


def decompressed(stream: IO[bytes], kind: str | None) -> IO[bytes]:
    """A stream of the uncompressed bytes of `stream` (`kind` from mediatypes.compression)."""
    if kind is None:
        return stream
    if kind == "gzip":
        return cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb"))
    return cast(IO[bytes], io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(stream)))
