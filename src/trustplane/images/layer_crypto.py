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
from trustplane.oci.model import Descriptor
from trustplane.oci.transport import ImageSource
from trustplane.progress import Advance
from trustplane.streaming import INPUT, OUTPUT, pump


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
                    (OUTPUT, sink.write),
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


def decrypt_blob(
    source: ImageSource,
    layer: Descriptor,
    private: PrivateOptions,
    public: PublicOptions,
    out: Path,
    progress: Advance | None,
) -> int:
    """Decrypt into `out`; returns the plaintext size once everything checks."""
    mac = new_mac(private.symkey)
    plain_digest = _hasher(private.digest)
    what = f"{source.ref}: layer {layer.digest}"
    try:
        with source.open_blob(layer) as stream, out.open("wb") as sink:
            size = pump(
                stream,
                [(INPUT, mac.update), (OUTPUT, plain_digest.update), (OUTPUT, sink.write)],
                transform=Keystream(private.symkey, private.nonce),
                limit=layer.size + 1,
                progress=progress,
            )
        if size != layer.size:
            raise IntegrityError(f"{what}: {size} bytes where the manifest says {layer.size}")
        check_mac(public.hmac, mac, what)
        if _name(plain_digest) != private.digest:
            raise IntegrityError(f"{what}: decrypted content does not match its digest")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return size


def _hasher(digest: str) -> hashlib._Hash:
    return hashlib.new(digest.partition(":")[0])


def _name(hasher: hashlib._Hash) -> str:
    return f"{hasher.name}:{hasher.hexdigest()}"
