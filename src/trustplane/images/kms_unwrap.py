"""Layer keys from the control plane's KMS instead of a local private key.

The KMS answers an unwrap with the layer's private options encrypted to the
caller's transport key, so nothing on the wire opens the layer for anyone
else. By default each run makes a throw-away transport key pair; a node
that attested gives the key its TPM certified instead (agent/zero_trust.py).
A layer the policy does not grant to the caller comes back as "cannot open",
which truncates the image at that tier (`on_refusal` decides; a subclass may
refuse louder).
"""

from __future__ import annotations

from trustplane.client import ControlClient
from trustplane.crypto import keywrap
from trustplane.crypto.keys import generate_key_pair, load_unwrap_key
from trustplane.errors import Forbidden, IntegrityError


class KmsUnwrapper:
    def __init__(self, client: ControlClient, transport: tuple[bytes, str] | None = None) -> None:
        """`transport`: (private key PEM, public key PEM); default: a fresh P-256 pair."""
        self.client = client
        if transport is None:
            private, public = generate_key_pair("ec-p256")
            transport = (private, public.decode())
        self._key = load_unwrap_key(transport[0], "transport key")
        self.transport_pem = transport[1]

    def open_layer(self, annotation: str, what: str) -> bytes | None:
        try:
            answer = self.client.unwrap(annotation, self.transport_pem)
        except Forbidden as exc:
            return self.on_refusal(exc)
        payload = keywrap.unwrap(answer.jwe, [self._key], what)
        if payload is None:
            raise IntegrityError(f"{what}: the KMS answered with keys not wrapped for us")
        return payload

    def on_refusal(self, refusal: Forbidden) -> bytes | None:
        """What a layer the KMS will not open for us becomes: None, a cut image."""
        return None
