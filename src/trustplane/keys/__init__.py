"""The KMS's keys: the secret store and its ACL (Barbican-shaped, secret_store.py),
envelope encryption (envelope.py), key-encryption-key providers (kek.py: file,
KMIP) and KEK rotation (rotation.py). No HTTP and no database here: the
control plane serves the store (control/secrets.py) and keeps its rows
(control/secret_rows.py)."""
