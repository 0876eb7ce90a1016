"""`GET /v1/images?repository=`: what edge gateways read to authenticate an image."""

from __future__ import annotations

import os

import pytest
from control_helpers import add_policy_rule

from trustplane.api.images import LayerRecord
from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.errors import AuthError, Forbidden, MalformedError

DIGEST = "sha256:" + "ab" * 32
LAYER = "sha256:" + "cd" * 32


def test_registered_images_can_be_looked_up(
    admin: ControlClient, control_plane: RunningControlPlane
) -> None:
    repository = f"gw-lookup-{os.getpid()}/app"
    assert admin.images(repository) == []
    layers = [LayerRecord(index=0, digest=LAYER, encrypted=False, diff_id=LAYER)]
    admin.register_image(repository, DIGEST, layers)
    admin.register_image(repository, DIGEST, layers)  # idempotent
    (record,) = admin.images(repository)
    assert record.manifest_digest == DIGEST
    assert record.layers[0].diff_id == LAYER
    assert record.publisher == "user:admin"
    assert admin.images(repository + "x") == []

    user = admin.create_user(f"gw-lookup-{os.getpid()}", "user")
    with control_plane.client() as client:
        client.login(user.name, user.password)
        assert len(client.images(repository)) == 1  # users may pull, so may look
        add_policy_rule(
            control_plane,
            f"""  - effect: deny
    subjects: ["user:{user.name}"]
    actions: [image.pull]
    resources: ["image:{repository}"]
""",
        )
        with pytest.raises(Forbidden, match=r"image\.pull"):
            client.images(repository)
        with pytest.raises(MalformedError):
            client.images("bad\nname")
    with control_plane.client() as anonymous, pytest.raises(AuthError):
        anonymous.images(repository)
