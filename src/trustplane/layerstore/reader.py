"""One pass over a layer blob: decrypt, decompress, hash, and the verdict at the end.

    blob (as sent) --HMAC, size--> keystream --plain digest--> decompress
        --diff_id--> tar applier

The tar is applied into a *prepared* layer, encrypted under its own key and
not yet usable by anything; `verdict()` then checks the HMAC over the
ciphertext (encrypted layers), the digest of the plain blob, the size, and
the diff_id the image config names. Only if all of them hold is the layer
committed: that is the release. So an encrypted layer's plaintext exists
only inside an encrypted snapshot, and nothing of a layer is used before it
is authenticated (image decrypt gives the same guarantee with a plaintext
staging file, which the store must not have).

Memory is flat: a chunk at a time, whatever the layer's size.
"""

from __future__ import annotations

import hashlib
import io
from typing import IO, Any, cast

from trustplane.crypto.layer_cipher import Keystream, check_mac, new_mac
from trustplane.errors import IntegrityError
from trustplane.images.decrypt import OpenedLayer
from trustplane.oci import mediatypes
from trustplane.oci.compression import decompressed
from trustplane.oci.model import Descriptor
from trustplane.progress import Advance
from trustplane.streaming import CHUNK_SIZE, Readable

_DRAIN = 1 << 20


class _Tap(io.RawIOBase):
    """Reads through, counting and hashing; optionally transforms (the keystream)."""

    def __init__(
        self,
        inner: Readable,
        before: list[Any],
        after: list[Any],
        transform: Keystream | None = None,
        limit: int | None = None,
        progress: Advance | None = None,
    ) -> None:
        self._inner = inner
        self._before = before
        self._after = after
        self._transform = transform
        self._limit = limit
        self._progress = progress
        self._buffer = bytearray(CHUNK_SIZE)
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), CHUNK_SIZE)
        if self._limit is not None:
            want = min(want, self._limit - self.count)
        if want <= 0:
            return 0
        n = self._inner.readinto(memoryview(self._buffer)[:want]) or 0
        if n == 0:
            return 0
        data: bytes | memoryview = memoryview(self._buffer)[:n]
        for update in self._before:
            update(data)
        if self._transform is not None:
            data = self._transform.update(bytes(data))
        for update in self._after:
            update(data)
        view[:n] = data
        self.count += n
        if self._progress is not None:
            self._progress(n)
        return n


class LayerReader:
    """The uncompressed tar of one layer, read once; `verdict()` when it is consumed."""

    def __init__(
        self,
        blob: Readable,
        layer: Descriptor,
        diff_id: str,
        opened: OpenedLayer | None,
        what: str,
        progress: Advance | None = None,
    ) -> None:
        self.layer = layer
        self.diff_id = diff_id
        self.opened = opened
        self.what = what
        self._mac = new_mac(opened.private.symkey) if opened is not None else None
        want = opened.private.digest if opened is not None else layer.digest
        self._plain = hashlib.new(want.partition(":")[0])
        self._diff = hashlib.sha256()
        self._raw = _Tap(
            blob,
            [self._mac.update] if self._mac is not None else [],
            [self._plain.update],
            Keystream(opened.private.symkey, opened.private.nonce) if opened else None,
            limit=layer.size + 1,
            progress=progress,
        )
        self.compression = mediatypes.compression(mediatypes.decrypted(layer.media_type))
        buffered = io.BufferedReader(self._raw, CHUNK_SIZE)
        self._decompressed = decompressed(cast(IO[bytes], buffered), self.compression)
        hashed = _Tap(cast(Readable, self._decompressed), [], [self._diff.update])
        self.tar = cast(IO[bytes], io.BufferedReader(hashed, CHUNK_SIZE))

    @property
    def plain_digest(self) -> str:
        return f"{self._plain.name}:{self._plain.hexdigest()}"

    def verdict(self) -> str:
        """Read what is left, then check everything; returns the plain blob digest."""
        while self.tar.read(_DRAIN):
            pass  # the tar's trailing padding belongs to the diff_id
        self.authenticate()
        diff_id = "sha256:" + self._diff.hexdigest()
        if diff_id != self.diff_id:
            raise IntegrityError(
                f"{self.what}: content does not match the config's diff_id {self.diff_id}"
            )
        return self.plain_digest

    def authenticate(self) -> None:
        """Size, HMAC and blob digest of everything the source sent (reads the rest of it)."""
        while self._raw.read(_DRAIN):
            pass
        if self._raw.count != self.layer.size:
            raise IntegrityError(
                f"{self.what}: {self._raw.count} bytes where the manifest says {self.layer.size}"
            )
        if self.opened is None:
            if self.plain_digest != self.layer.digest:
                raise IntegrityError(f"{self.what}: blob does not match its digest")
            return
        assert self._mac is not None
        check_mac(self.opened.public.hmac, self._mac, self.what)
        want = self.opened.private.digest
        if self.plain_digest != want and not self._skopeo_digest(want):
            raise IntegrityError(f"{self.what}: decrypted content does not match its digest")

    def _skopeo_digest(self, want: str) -> bool:
        """skopeo compresses an uncompressed layer while encrypting it, yet records the
        digest of the uncompressed original: then the diff_id is that digest
        (images/layer_crypto.py checks the same with a second pass)."""
        return self.compression is not None and "sha256:" + self._diff.hexdigest() == want
