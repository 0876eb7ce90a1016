"""Trustplane volumes through the edge gateway: the caller must be allowed the volume.

The volume plugin gets a volume's key as the node, whoever asked dockerd
for the mount; so the gateway asks the control plane for the caller too
(`volume.attach`, `volume.create`, `volume.delete` on `volume:NAME`). Real
components: a control plane with a file backend, the `trustplane
volume-plugin` process serving a private dockerd, and a `trustplane
gateway` process in front of that dockerd. `mallory` is an operator (she
may start containers) whom the policy denies every volume action; `alice`
is an operator with the defaults.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from control_helpers import entries_since, log_size
from gateway_helpers import DockerCli, RunningGateway, register_local_image, start_gateway
from volume_plugin_helpers import NOTHING, TAG, VOLUME_TYPE, Stack, create_volume, plugin_stack

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.volume_plugin import replace_policy, volume_node_rules


@dataclass
class Scene:
    stack: Stack
    gateway: RunningGateway
    alice: DockerCli
    mallory: DockerCli

    @property
    def dockerd(self) -> DockerCli:
        """dockerd itself, past the gateway: what really happened there."""
        return self.stack.docker

    def container_exists(self, name: str) -> bool:
        return self.dockerd("container", "inspect", name).returncode == 0

    def volume_driver(self, name: str) -> str | None:
        result = self.dockerd("volume", "inspect", "--format", "{{.Driver}}", name)
        return result.stdout.strip() if result.returncode == 0 else None

    def stat(self, cli: DockerCli, container: str, path: str) -> bytes:
        """`HEAD /containers/NAME/archive?path=PATH` as `cli`'s caller, where `cli` talks."""
        token = json.loads((cli.config_dir / "config.json").read_text())["HttpHeaders"]
        head = (
            f"HEAD /v1.41/containers/{container}/archive?path={path} HTTP/1.1\r\nHost: d\r\n"
            f"X-Trustplane-Token: {token['X-Trustplane-Token']}\r\n\r\n"
        )
        where = RunningGateway(Path(cli.host.removeprefix("unix://")), "", self.gateway.process)
        return where.raw(head.encode())

    def authorize_entries(self, start: int, subject: str) -> list[dict[str, Any]]:
        with self.stack.plane.admin() as admin:
            return [
                entry
                for entry in entries_since(admin, start)
                if entry["kind"] == "authorize" and entry.get("subject") == subject
            ]


@pytest.fixture(scope="module", params=["proxy", "authz-plugin"])
def scene(request: pytest.FixtureRequest) -> Iterator[Scene]:
    """`proxy`: the callers use the gateway's socket; `authz-plugin`: dockerd's own,
    with the gateway as its authorization plugin (the same decisions)."""
    with contextlib.ExitStack() as later:
        yield from _scene(later, request.param == "authz-plugin")


def _scene(later: contextlib.ExitStack, authz: bool) -> Iterator[Scene]:
    gateways: list[RunningGateway] = []
    admin_token: list[str] = []

    def authz_plugin(top: Path, plane: RunningControlPlane, plugins: Path) -> tuple[list[str], str]:
        name = "tpgwvolumes"
        placeholder = DockerDaemon(socket=top / "d.sock", started_by_us=False)
        gateway = later.enter_context(
            contextlib.contextmanager(start_gateway)(
                top / "gw", plane, placeholder, "--authz-plugin", f"unix://{plugins}/{name}.sock"
            )
        )
        gateways.append(gateway)
        with plane.client() as login:
            token = login.login("admin", plane.admin_password).access_token
        admin_token.append(token)
        return [f"--authorization-plugin={name}"], token

    with plugin_stack(authz_plugin if authz else None) as stack:
        rules = (
            volume_node_rules(stack.node)
            + """\
  - effect: deny
    subjects: ["user:mallory"]
    actions: [volume.attach, volume.create, volume.delete]
    resources: ["volume:*"]
"""
        )
        replace_policy(stack.plane, stack.base_policy + rules)
        client = stack.daemon.client()
        if admin_token:
            client.api.headers["X-Trustplane-Token"] = admin_token[0]
        try:
            register_local_image(stack.plane, client, TAG)
        finally:
            client.close()
        tokens = {}
        with stack.plane.admin() as admin:
            for name in ("alice", "mallory"):
                created = admin.create_user(name, "operator")
                with stack.plane.client() as login:
                    tokens[name] = login.login(name, created.password).access_token
        if not authz:
            gateways.append(
                later.enter_context(
                    contextlib.contextmanager(start_gateway)(
                        stack.top / "gw", stack.plane, stack.daemon
                    )
                )
            )
        gateway = gateways[0]
        host = stack.daemon.base_url if authz else gateway.host
        yield Scene(
            stack,
            gateway,
            DockerCli.make(host, stack.top / "alice", tokens["alice"]),
            DockerCli.make(host, stack.top / "mallory", tokens["mallory"]),
        )


def test_a_caller_without_volume_attach_cannot_mount_a_trustplane_volume(scene: Scene) -> None:
    create_volume(scene.stack, "gv1")
    start = log_size(scene.stack.plane)
    refusal = "refuses volume.attach on volume:gv1"
    scene.mallory.refused("run", "--name", "m1", "-v", "gv1:/data", TAG, "true", text=refusal)
    scene.mallory.refused(
        "run", "--name", "m2", "--mount", "type=volume,source=gv1,target=/data", TAG, "true",
        text=refusal,
    )  # fmt: skip
    scene.mallory.refused(
        "run", "--name", "m3", "--volume-driver", "trustplane", "-v", "gv1:/data", TAG, "true",
        text=refusal,
    )  # fmt: skip
    scene.mallory.refused(
        "create", "--name", "m4", "--mount",
        "type=volume,source=gv1,target=/data,volume-driver=trustplane", TAG, "true", text=refusal,
    )  # fmt: skip
    # dockerd never saw a create: no container, nothing opened.
    for name in ("m1", "m2", "m3", "m4"):
        assert not scene.container_exists(name), name
    assert scene.stack.nothing_left() == NOTHING
    # Each refusal is the control plane's own decision, in its log.
    entries = scene.authorize_entries(start, "user:mallory")
    assert {e["decision"] for e in entries if e["action"] == "container.start"} == {"allow"}
    denied = [e for e in entries if e["action"].startswith("volume.")]
    assert len(denied) == 4, denied
    assert {(e["action"], e["resource"], e["decision"]) for e in denied} == {
        ("volume.attach", "volume:gv1", "deny")
    }

    # The same run by a caller allowed the volume works, and the data is there.
    out = scene.alice.ok(
        "run", "--rm", "--network", "none", "-v", "gv1:/data", TAG,
        "sh", "-c", "echo kept > /data/note && cat /data/note",
    )  # fmt: skip
    assert out.strip() == "kept"
    out = scene.alice.ok(
        "run", "--rm", "--network", "none", "--mount", "type=volume,source=gv1,target=/data",
        TAG, "cat", "/data/note",
    )  # fmt: skip
    assert out.strip() == "kept"
    assert scene.stack.nothing_left() == NOTHING


def test_a_container_made_by_someone_allowed_is_not_a_way_in(scene: Scene) -> None:
    create_volume(scene.stack, "gv2")
    scene.alice.ok("create", "--name", "a2", "--network", "none", "-v", "gv2:/data", TAG,
                   "cat", "/data/x")  # fmt: skip
    try:
        refusal = "refuses volume.attach on volume:gv2"
        scene.mallory.refused("start", "a2", text=refusal)
        # A path stat (read-only otherwise) and `docker cp` out of a stopped
        # container mount its volumes too.
        assert scene.stat(scene.mallory, "a2", "/data").startswith(b"HTTP/1.1 403 ")
        assert scene.stat(scene.alice, "a2", "/data").startswith(b"HTTP/1.1 200 ")
        scene.mallory.refused("cp", "a2:/data/x", str(scene.stack.top / "x"), text=refusal)
        state = scene.dockerd.ok("container", "inspect", "--format", "{{.State.Status}}", "a2")
        assert state.strip() == "created"
        assert scene.stack.nothing_left() == NOTHING
        scene.alice.ok("start", "a2")  # allowed: it mounts and runs (cat fails: no file)
    finally:
        scene.dockerd("rm", "-f", "a2")


def test_a_new_or_anonymous_trustplane_volume_in_a_run_needs_volume_create(scene: Scene) -> None:
    scene.mallory.refused(
        "run", "--name", "m5", "--volume-driver", "trustplane", "-v", "gvnew:/data", TAG, "true",
        text="refuses volume.create on volume:gvnew",
    )  # fmt: skip
    scene.mallory.refused(
        "run", "--name", "m6", "--volume-driver", "trustplane", "-v", "/data", TAG, "true",
        text="anonymous trustplane volumes are refused",
    )  # fmt: skip
    scene.alice.refused(
        "run", "--name", "m7", "--mount", "type=volume,target=/data,volume-driver=trustplane",
        TAG, "true", text="anonymous trustplane volumes are refused",
    )  # fmt: skip
    for name in ("m5", "m6", "m7"):
        assert not scene.container_exists(name), name
    assert scene.volume_driver("gvnew") is None
    # A local volume is no trustplane volume: it needs nothing more than before.
    out = scene.mallory.ok("run", "--rm", "--network", "none", "-v", "gvlocal:/data", TAG,
                           "sh", "-c", "echo local > /data/f && cat /data/f")  # fmt: skip
    assert out.strip() == "local"
    assert scene.volume_driver("gvlocal") == "local"
    scene.dockerd.ok("volume", "rm", "gvlocal")


def test_volume_create_and_rm_of_trustplane_volumes_need_the_volume_actions(
    scene: Scene,
) -> None:
    opts = ("--opt", f"type={VOLUME_TYPE}", "--opt", "size=64M")
    scene.mallory.refused("volume", "create", "-d", "trustplane", *opts, "gv3",
                          text="refuses volume.create on volume:gv3")  # fmt: skip
    assert scene.volume_driver("gv3") is None
    with scene.stack.plane.admin() as admin:
        assert "gv3" not in {v.name for v in admin.volumes()}
    scene.alice.ok("volume", "create", "-d", "trustplane", *opts, "gv3")
    assert scene.volume_driver("gv3") == "trustplane"

    scene.mallory.refused("volume", "rm", "gv3", text="refuses volume.delete on volume:gv3")
    # API 1.41 (the gateway's) prunes every unused volume, named ones too.
    scene.mallory.refused("volume", "prune", "--force",
                          text="refuses volume.delete on volume:*")  # fmt: skip
    assert scene.volume_driver("gv3") == "trustplane"
    with scene.stack.plane.admin() as admin:
        assert "gv3" in {v.name for v in admin.volumes()}
    scene.alice.ok("volume", "rm", "gv3")
    assert scene.volume_driver("gv3") is None
    # A local volume's rm needs no volume action.
    scene.dockerd.ok("volume", "create", "gvlocal2")
    scene.mallory.ok("volume", "rm", "gvlocal2")
