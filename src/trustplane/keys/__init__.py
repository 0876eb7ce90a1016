"""KMS: envelope encryption, key-encryption-key providers, secret references, access checks."""
