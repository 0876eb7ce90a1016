"""Annotation keys trustplane reads and writes."""

from __future__ import annotations

ENC_KEYS_JWE = "org.opencontainers.image.enc.keys.jwe"
"""ocicrypt: std-base64 JWEs (comma-separated) wrapping the private options."""
ENC_PUBOPTS = "org.opencontainers.image.enc.pubopts"
"""ocicrypt: std-base64 JSON of the cipher name and the ciphertext HMAC."""
ENC_PREFIX = "org.opencontainers.image.enc."

PROTECTED_CONFIG = "dev.trustplane.config.jwe"
"""On the config descriptor: std-base64 JWEs (comma-separated), one per tier,
each carrying the original config cut to what that tier may see."""

COSIGN_SIGNATURE = "dev.cosignproject.cosign/signature"
"""On a cosign simple-signing layer: std-base64 signature over the layer's bytes."""
SIGNATURE_LOG_INDEX = "dev.trustplane.log.index"
"""On a signature layer trustplane logged: the entry's index in the control
plane's transparency log (unsigned; `image verify --require-log` proves it)."""
