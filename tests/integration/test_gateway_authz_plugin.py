"""The gateway's decision code as a Docker authorization plugin, with a real dockerd.

A second dockerd (own socket, state and network namespace) runs with
`--authorization-plugin`; the docker CLI talks to that dockerd directly,
and every request is judged by the gateway's Gatekeeper over the plugin
socket: the same refusals as through the proxy, checked on dockerd's side.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_helpers import PREFIX, DockerCli, make_people, start_gateway

from trustplane.api.images import LayerRecord
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon, ensure_dockerd
from trustplane.embedded.sample_images import import_busybox_base

PLUGIN_DIR = Path("/run/docker/plugins")
TAG = "trustplane/busybox:authz"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """containerd's socket paths under the state dir must stay below 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tpz-", dir="/tmp"))
    yield path
    subprocess.run(["umount", "-R", str(path / "state" / "data")], capture_output=True,
                   check=False)  # fmt: skip
    shutil.rmtree(path, ignore_errors=True)


def test_dockerd_with_the_plugin_refuses_what_the_gateway_refuses(
    short_tmp: Path, control_plane: RunningControlPlane
) -> None:
    name = f"tpgw{os.getpid()}authz"
    plugin_socket = PLUGIN_DIR / f"{name}.sock"
    sock = short_tmp / "d.sock"
    people = make_people(control_plane, "authz")
    placeholder = DockerDaemon(socket=sock, started_by_us=False)
    # The plugin must answer before dockerd starts: dockerd validates it then.
    gateways = start_gateway(
        short_tmp / "gw", control_plane, placeholder, "--authz-plugin", f"unix://{plugin_socket}"
    )
    next(gateways)
    daemon: DockerDaemon | None = None
    try:
        daemon = ensure_dockerd(
            short_tmp / "work", socket=sock, state_dir=short_tmp / "state",
            extra_args=[f"--authorization-plugin={name}"], private_network=True,
        )  # fmt: skip
        assert daemon.started_by_us
        client = daemon.client()
        client.api.headers["X-Trustplane-Token"] = people.operator_token
        try:
            import_busybox_base(client, TAG)  # an operator's import: container.modify
            image = client.images.get(TAG)
            layers = [LayerRecord(index=i, digest=d, encrypted=False, diff_id=d)
                      for i, d in enumerate(image.attrs["RootFS"]["Layers"])]  # fmt: skip
        finally:
            client.close()
        with control_plane.admin() as admin:
            admin.register_image(TAG.rsplit(":", 1)[0], str(image.id), layers)

        host = f"unix://{sock}"
        operator = DockerCli.make(host, short_tmp / "op", people.operator_token)
        user = DockerCli.make(host, short_tmp / "user", people.user_token)
        nobody = DockerCli.make(host, short_tmp / "nobody", None)
        ran = operator.ok("run", "--rm", "--name", f"{PREFIX}-authz-ok", TAG, "echo", "allowed")
        assert "allowed" in ran
        assert "CONTAINER ID" in user.ok("ps")  # read-only: any verified caller
        user.refused("run", "--name", f"{PREFIX}-authz-user", TAG, "true",
                     text="normal privilege")  # fmt: skip
        operator.refused("run", "--name", f"{PREFIX}-authz-bind", "-v", "/:/h", TAG, "true",
                         text="host-bind access")  # fmt: skip
        nobody.refused("ps", text="X-Trustplane-Token")
        names = operator.ok("ps", "-a", "--format", "{{.Names}}").split()
        assert f"{PREFIX}-authz-user" not in names  # checked on dockerd's side
        assert f"{PREFIX}-authz-bind" not in names
    finally:
        if daemon is not None:
            daemon.stop()
        gateways.close()
        plugin_socket.unlink(missing_ok=True)
