"""Encrypting and decrypting one layer blob, streamed, verified before release.

Encryption checks the plaintext against its descriptor while it encrypts
(a registry could send anything) and computes the HMAC and the new digest in
the same pass. Decryption writes plaintext only to a private staging file
and accepts it only when the HMAC over the ciphertext *and* the digest of the
plaintext both match; otherwise the file is deleted and IntegrityError is
raised. Nothing reaches a destination before that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from trustplane.crypto.layer_cipher import (
    Keystream,
    PrivateOptions,
    PublicOptions,
    check_mac,
    new_mac,
    new_nonce,
)
from trustplane.errors import IntegrityError
from trustplane.oci import mediatypes
from trustplane.oci.compression import DECOMPRESSION_ERRORS, decompressed
from trustplane.oci.model import Descriptor
from trustplane.oci.transport import ImageSource
from trustplane.progress import Advance
from trustplane.streaming import INPUT, OUTPUT, DurableSink, pump


@dataclass(frozen=True)
class EncryptedBlob:
    digest: str
    size: int
    private: PrivateOptions
    public: PublicOptions


def encrypt_blob(
    source: ImageSource, layer: Descriptor, symkey: bytes, out: Path, progress: Advance | None
) -> EncryptedBlob:
    nonce = new_nonce()
    plain_digest = _hasher(layer.digest)
    mac = new_mac(symkey)
    cipher_digest = hashlib.sha256()
    try:
        with source.open_blob(layer) as stream, out.open("wb") as sink:
            size = pump(
                stream,
                [
                    (INPUT, plain_digest.update),
                    (OUTPUT, mac.update),
                    (OUTPUT, cipher_digest.update),
                    (OUTPUT, DurableSink(sink).write),
                ],
                transform=Keystream(symkey, nonce),
                limit=layer.size + 1,
                progress=progress,
            )
        if size != layer.size or _name(plain_digest) != layer.digest:
            raise IntegrityError(f"{source.ref}: layer {layer.digest} does not match its digest")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return EncryptedBlob(
        digest="sha256:" + cipher_digest.hexdigest(),
        size=size,
        private=PrivateOptions(symkey=symkey, nonce=nonce, digest=layer.digest),
        public=PublicOptions(hmac=mac.digest()),
    )


@dataclass(frozen=True)
class DecryptedBlob:
    digest: str
    size: int


def decrypt_blob(
    source: ImageSource,
    layer: Descriptor,
    private: PrivateOptions,
    public: PublicOptions,
    out: Path,
    progress: Advance | None,
) -> DecryptedBlob:
    """Decrypt into `out`; returns the plaintext's digest once everything checks."""
    mac = new_mac(private.symkey)
    plain_digest = _hasher(private.digest)
    what = f"{source.ref}: layer {layer.digest}"
    try:
        with source.open_blob(layer) as stream, out.open("wb") as sink:
            size = pump(
                stream,
                [
                    (INPUT, mac.update),
                    (OUTPUT, plain_digest.update),
                    (OUTPUT, DurableSink(sink).write),
                ],
                transform=Keystream(private.symkey, private.nonce),
                limit=layer.size + 1,
                progress=progress,
            )
        if size != layer.size:
            raise IntegrityError(f"{what}: {size} bytes where the manifest says {layer.size}")
        check_mac(public.hmac, mac, what)
        actual = _name(plain_digest)
        if actual != private.digest and not _recompressed_by_skopeo(out, layer, private.digest):
            raise IntegrityError(f"{what}: decrypted content does not match its digest")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return DecryptedBlob(digest=actual, size=size)


def _recompressed_by_skopeo(path: Path, layer: Descriptor, digest: str) -> bool:
    """skopeo compresses an uncompressed layer while encrypting it, yet records
    the digest of the uncompressed original (ocicrypt takes it from the source
    descriptor). Such a layer is genuine when its decompressed content matches
    that digest; checking costs a second pass, only in this case."""
    kind = mediatypes.compression(layer.media_type)
    if kind is None:
        return False
    hasher = _hasher(digest)
    try:
        with path.open("rb") as raw, decompressed(raw, kind) as stream:
            while chunk := stream.read(1 << 20):
                hasher.update(chunk)
    except DECOMPRESSION_ERRORS:
        return False  # not even valid compressed data: simply not genuine
    return _name(hasher) == digest


def _hasher(digest: str) -> hashlib._Hash:
    return hashlib.new(digest.partition(":")[0])


def _name(hasher: hashlib._Hash) -> str:
    return f"{hasher.name}:{hasher.hexdigest()}"
