"""The CLI refuses, before any request, exactly the values the control plane
would: its choices are the server's (the API's models, trustplane.api), checked
here so that the two cannot drift apart."""

from __future__ import annotations

from typing import Any, get_args

from trustplane.api.fields import NAME
from trustplane.api.identity import NewNode, NewUser
from trustplane.api.kms import NewRecipient
from trustplane.cli import admin, kms
from trustplane.crypto.keys import KeyType


def _choices(model: Any, field: str) -> set[str]:
    return set(get_args(model.model_fields[field].annotation))


def test_roles_kinds_and_key_types_are_the_servers() -> None:
    assert set(get_args(admin.Role)) == _choices(NewUser, "role")
    assert set(get_args(admin.NodeKind)) == _choices(NewNode, "kind")
    assert set(get_args(KeyType)) == _choices(NewRecipient, "key_type")


def test_names_follow_the_servers_pattern() -> None:
    assert admin.NAME.pattern == NAME.removeprefix("^").removesuffix("$")


def test_a_secret_is_its_reference_or_its_uuid() -> None:
    uuid = "0b5e3c8e-2a7d-4c41-9d62-3f2a9a1d8c11"
    assert kms.secret_uuid(uuid) == uuid
    assert kms.secret_uuid(uuid.upper()) == uuid
    assert kms.secret_uuid(f"https://cp.example:8443/v1/secrets/{uuid}") == uuid
    assert kms.secret_uuid(f"https://cp.example:8443/v1/secrets/{uuid}/") == uuid
