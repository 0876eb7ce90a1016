"""The KMS's own failures are the KMS's: 503 and an honest log entry, never 401/403."""

from __future__ import annotations

import os
import sqlite3
import uuid

import pytest
from control_helpers import entries_since, log_size

from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.errors import UnavailableError


def test_a_secret_the_kms_cannot_unseal_is_503_and_logged_as_error(
    control_plane: RunningControlPlane, admin: ControlClient
) -> None:
    name = f"unseal-{uuid.uuid4().hex[:8]}"
    password = os.urandom(12).hex()
    admin.create_user(name, "operator", password)
    with control_plane.client() as owner:
        owner.login(name, password)
        payload = os.urandom(32)
        secret = owner.create_secret(payload, name="to-be-damaged")
        assert owner.secret_payload(secret.id) == payload

        # The stored row is altered behind the server's back (a disk fault, or
        # someone with the database file): its ciphertext no longer authenticates.
        with sqlite3.connect(control_plane.data_dir / "trustplane.db") as db:
            (ciphertext,) = db.execute(
                "SELECT ciphertext FROM secrets WHERE id = ?", (secret.id,)
            ).fetchone()
            damaged = bytes(ciphertext[:-1]) + bytes([ciphertext[-1] ^ 1])
            db.execute("UPDATE secrets SET ciphertext = ? WHERE id = ?", (damaged, secret.id))

        before = log_size(control_plane)
        with pytest.raises(UnavailableError, match="cannot unseal") as failure:
            owner.secret_payload(secret.id)
        assert payload.hex() not in str(failure.value)

        (entry,) = [
            e
            for e in entries_since(admin, before)
            if e["kind"] == "kms.release" and e["resource"] == f"secret:{secret.id}"
        ]
        assert entry["subject"] == f"user:{name}"
        assert entry["decision"] == "error"
        assert "not released" in entry["reason"]
