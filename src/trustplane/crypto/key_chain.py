"""The one-way chain of layer keys behind tiered access (seed 000).

Layer keys are derived top-down from one random key for the highest layer:

    K[top]  = 32 random bytes
    K[i]    = HKDF-SHA256(ikm=K[i+1], salt=none,
                          info="trustplane layer-key chain v1" || uint32_be(i),
                          length=32)

HKDF is a pseudo-random function of its input key, so K[i] reveals nothing
about K[i+1]: whoever holds the key of layer k can compute the keys of layers
0..k and none above. Binding the index in `info` makes every link distinct,
so a key cannot be replayed one position up or down the chain.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustplane.crypto.layer_cipher import KEY_SIZE, new_symkey

_INFO = b"trustplane layer-key chain v1"


def derive_lower(upper: bytes, index: int) -> bytes:
    """K[index] from K[index + 1]."""
    if len(upper) != KEY_SIZE:
        raise ValueError("chain keys are 32 bytes")
    if index < 0:
        raise ValueError("layer index must be non-negative")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=None,
        info=_INFO + index.to_bytes(4, "big"),
    )
    return hkdf.derive(upper)


def chain_below(key: bytes, index: int) -> list[bytes]:
    """Keys of layers 0..index, given the key of layer `index`."""
    keys = [key]
    for lower in range(index - 1, -1, -1):
        keys.append(derive_lower(keys[-1], lower))
    keys.reverse()
    return keys


def new_chain(layers: int) -> list[bytes]:
    """Fresh keys for layers 0..layers-1, linked as above."""
    if layers < 1:
        raise ValueError("a chain has at least one layer")
    return chain_below(new_symkey(), layers - 1)
