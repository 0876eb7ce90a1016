"""Layer keys from the control plane's KMS instead of a local private key.

Each run makes a throw-away transport key pair; the KMS answers an unwrap
with the layer's private options encrypted to it, so nothing on the wire
opens the layer for anyone else. (The attestation issue binds the
transport key to the node's TPM.) A layer the policy does not grant to the
caller comes back as "cannot open", which truncates the image at that tier.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.client import ControlClient
from trustplane.crypto import keywrap
from trustplane.crypto.keys import load_unwrap_key
from trustplane.errors import Forbidden, IntegrityError


class KmsUnwrapper:
    def __init__(self, client: ControlClient) -> None:
        self.client = client
        private = ec.generate_private_key(ec.SECP256R1())
        self._key = load_unwrap_key(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "transport key",
        )
        self.transport_pem = (
            private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def open_layer(self, annotation: str, what: str) -> bytes | None:
        try:
            answer = self.client.unwrap(annotation, self.transport_pem)
        except Forbidden:
            return None
        payload = keywrap.unwrap(answer.jwe, [self._key], what)
        if payload is None:
            raise IntegrityError(f"{what}: the KMS answered with keys not wrapped for us")
        return payload
