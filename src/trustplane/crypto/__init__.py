"""Cryptographic primitives only, no I/O: the ocicrypt layer cipher, JWE key
wrapping, recipient keys and the layer-key chain."""
