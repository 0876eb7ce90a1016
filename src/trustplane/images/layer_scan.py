"""Read a plain layer's tar once, as the blob streams in, with its digest checked.

`--layers path:GLOB` (selection.py) lists a layer's files and registration
(reference_files.py) digests them; both read the same way: the blob is
hashed as it passes (and reported to a progress bar), decompressed as its
media type says (gzip, zstd or none), and its tar handed to the caller's
reader; whatever the tar leaves unread is hashed too, and the digest must be
the layer's. Memory stays flat in layer size.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from typing import IO, TypeVar

from trustplane.errors import IntegrityError, MalformedError
from trustplane.oci import mediatypes
from trustplane.oci.compression import DECOMPRESSION_ERRORS, decompressed
from trustplane.oci.model import Descriptor
from trustplane.oci.transport import ImageSource
from trustplane.streaming import Readable, ReadableFile

T = TypeVar("T")
_CHUNK = 1 << 20


def scan_layer(
    source: ImageSource,
    layer: Descriptor,
    read: Callable[[IO[bytes]], T],
    progress: Callable[[int], object] | None = None,
) -> T:
    """What `read` makes of the layer's (decompressed) tar stream, once its digest is checked.

    A stream that does not decompress or is not a valid tar (`tarfile.TarError`,
    or a MalformedError from `read`) is an IntegrityError naming the layer.
    """
    algorithm = layer.digest.partition(":")[0]
    digest = hashlib.new(algorithm)
    with source.open_blob(layer) as raw:
        counted = _Hashing(raw, digest, progress)
        kind = mediatypes.compression(layer.media_type)
        stream = decompressed(io.BufferedReader(ReadableFile(counted), _CHUNK), kind)
        try:
            result = read(stream)
        except (tarfile.TarError, *DECOMPRESSION_ERRORS) as exc:
            raise IntegrityError(
                f"layer {layer.digest} is not a valid tar archive: {exc}"
            ) from None
        except MalformedError as exc:
            raise IntegrityError(f"layer {layer.digest}: {exc}") from None
        while counted.readinto(memoryview(bytearray(_CHUNK))):
            pass  # the tar end may come before the blob's end; hash it all
    if f"{algorithm}:{digest.hexdigest()}" != layer.digest:
        raise IntegrityError(f"{source.ref}: layer {layer.digest} does not match its digest")
    return result


class _Hashing:
    """Hashes what passes through, and reports progress."""

    def __init__(
        self, inner: Readable, digest: hashlib._Hash, progress: Callable[[int], object] | None
    ) -> None:
        self.inner = inner
        self.digest = digest
        self.progress = progress

    def readinto(self, buffer: memoryview) -> int:
        n = self.inner.readinto(buffer) or 0
        self.digest.update(buffer[:n])
        if self.progress is not None and n:
            self.progress(n)
        return n
