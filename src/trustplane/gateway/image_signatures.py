"""Image signatures at the gateway: valid where they exist, or required.

The control plane logs each cosign signature a publisher records (payload,
signature, key id). The control plane only checked that the signature
matches the key the publisher sent along; which keys to trust is this
gateway's own choice (`--signature-key`). So, for the manifest digest an
image was authenticated by:

- signatures logged for it: at least one must verify with a trusted key,
  sign that very digest and name the image's repository (docker-reference);
  otherwise the image is refused, even when the gateway trusts no key;
- none logged: the image passes, unless the gateway requires signatures.

Verification is images/sign.py's own (the same checks `image verify` does).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from trustplane.api.signatures import SignatureEntry
from trustplane.crypto.signing import VerifyKey, load_verify_key
from trustplane.errors import (
    Forbidden,
    IntegrityError,
    MalformedError,
    UnsupportedError,
    UsageError,
)
from trustplane.gateway.control_link import ControlLink
from trustplane.images.sign import check_signed_payload
from trustplane.oci.reference import canonical, same_repository


@dataclass(frozen=True)
class SignaturePolicy:
    keys: tuple[VerifyKey, ...] = ()
    required: bool = False
    """Refuse images that carry no logged signature at all."""


def load_policy(key_files: list[Path], required: bool) -> SignaturePolicy:
    """The policy from public key files; a file that is no supported key is a UsageError."""
    keys: list[VerifyKey] = []
    for path in key_files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"signature key {path}: {exc.strerror}") from None
        try:
            keys.append(load_verify_key(data, str(path)))
        except (MalformedError, UnsupportedError) as exc:
            raise UsageError(f"signature key {exc}") from None
    if required and not keys:
        raise UsageError("--require-signatures needs at least one --signature-key")
    return SignaturePolicy(tuple(keys), required)


class SignatureCheck:
    def __init__(self, link: ControlLink, policy: SignaturePolicy) -> None:
        self.link = link
        self.policy = policy

    async def check(self, repository: str, digest: str, image_name: str) -> None:
        """Forbidden unless `repository@digest` passes (see the module's rules).

        `image_name` is the repository's canonical name (oci/reference.py),
        which the signed docker-reference must also name.
        """
        entries = await self.link.signatures(repository, digest)
        shown = f"{image_name}@{digest[:19]}"
        if not entries:
            if self.policy.required:
                raise Forbidden(
                    f"image {shown} has no signature, and this gateway requires signatures"
                )
            return
        failures: list[str] = []
        for entry in entries:
            reason = verify_entry(entry, self.policy.keys, digest, image_name)
            if reason is None:
                return
            failures.append(reason)
        raise Forbidden(
            f"image {shown}: none of its {len(entries)} signature(s) is valid on this "
            f"gateway: {'; '.join(failures[:3])}"
        )


def verify_entry(
    entry: SignatureEntry, keys: tuple[VerifyKey, ...], digest: str, image_name: str
) -> str | None:
    """None when `entry` verifies with a trusted key, else why not."""
    what = f"signature (log entry {entry.log_index})"
    if not keys:
        return f"{what}: this gateway trusts no signing key (--signature-key)"
    missing = f"{what} has no payload and signature to verify"
    encoded_payload, encoded_signature = entry.payload, entry.signature
    if encoded_payload is None or encoded_signature is None:
        return missing
    try:
        payload = base64.b64decode(encoded_payload, validate=True)
        signature = base64.b64decode(encoded_signature, validate=True)
    except (binascii.Error, ValueError):
        return missing
    if not payload or not signature:
        return missing
    reasons: list[str] = []
    for key in keys:
        try:
            critical, _ = check_signed_payload(payload, signature, key, digest, what)
        except IntegrityError as exc:
            reasons.append(str(exc))
            continue
        signed = str(critical["identity"]["docker-reference"])
        if not same_repository(signed, image_name):
            reasons.append(f"{what} names {_shown(signed)}, not {image_name} (docker-reference)")
            continue
        return None
    # Say the most telling reason: another image or repository, before a key mismatch.
    telling = [r for r in reasons if "does not verify" not in r]
    return (telling or reasons)[0]


def _shown(reference: str) -> str:
    """A signed docker-reference as the gateway reads it: canonical, or quoted if invalid."""
    try:
        return canonical(reference)
    except UsageError:
        return repr(reference[:200])
