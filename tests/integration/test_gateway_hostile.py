"""Hostile requests over the gateway's real socket, checked on dockerd's side.

Each request asks for something that must be denied (a privileged or
host-bound container, smuggled framing, a disguised path, malformed JSON)
and names its container with a unique marker. Afterwards dockerd itself is
asked: no container with a marker exists, and its event stream for the
whole window has no event for one. A benign request sent the same way is the
positive control: it does create its container, so the check can see one.
TRUSTPLANE_SOCKET_FUZZ_EXAMPLES sets the number of generated requests.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
from gateway_helpers import PREFIX, People, RunningGateway, make_people, start_gateway
from gateway_helpers import registered_base as registered_base
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon

EXAMPLES = int(os.environ.get("TRUSTPLANE_SOCKET_FUZZ_EXAMPLES", "300"))
MARK = f"{PREFIX}-fz"


@pytest.fixture(scope="module")
def hostile_gateway(
    work_dir: Path, control_plane: RunningControlPlane, docker_daemon: DockerDaemon
) -> Iterator[RunningGateway]:
    yield from start_gateway(work_dir / "gateway-hostile", control_plane, docker_daemon)


@pytest.fixture(scope="module")
def crew(control_plane: RunningControlPlane, registered_base: str) -> People:
    return make_people(control_plane, "fz")


def request(
    target: str,
    body: bytes,
    token: str,
    framing: str = "length",
    extra: tuple[str, ...] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"POST {target} {version}", "Host: docker", f"X-Trustplane-Token: {token}"]
    if not any(line.lower().startswith("content-type:") for line in extra):
        lines.append("Content-Type: application/json")
    payload = body
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "both":
        lines += [f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"]
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif framing == "double-length":
        lines += [f"Content-Length: {len(body)}", f"Content-Length: {len(body)}"]
    elif framing == "chunked-bad":
        lines.append("Transfer-Encoding: chunked")
        payload = b"%x;ext=1\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif framing == "te-list":
        lines.append("Transfer-Encoding: identity, chunked")
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif framing == "te-space":
        lines.append("Transfer-Encoding : chunked")
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def status_of(answer: bytes) -> int:
    """The final status (after any `100 Continue`)."""
    answer = answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    first = answer.split(b"\r\n", 1)[0].split(b" ")
    assert first[0] == b"HTTP/1.1", answer[:200]
    return int(first[1])


def marked_events(client: docker.DockerClient, since: float, mark: str = MARK) -> list[str]:
    until = time.time() + 1
    seen = []
    for event in client.events(since=int(since) - 1, until=int(until) + 1, decode=True):
        name = str(event.get("Actor", {}).get("Attributes", {}).get("name", ""))
        if name.startswith(mark):
            seen.append(f"{event.get('Action')} {name}")
    return seen


def marked_containers(client: docker.DockerClient, mark: str = MARK) -> list[str]:
    return [c.name for c in client.containers.list(all=True, filters={"name": mark})]


SMUGGLED = [
    ("both", "CL+TE"),
    ("double-length", "repeated"),
    ("chunked-bad", "chunk size"),
    ("te-list", "chunked"),
    ("te-space", "header line"),
]


def test_smuggling_is_refused_before_dockerd(
    hostile_gateway: RunningGateway,
    crew: People,
    busybox_base: str,
    docker_client: docker.DockerClient,
) -> None:
    since = time.time()
    benign = json.dumps({"Image": busybox_base, "Cmd": ["true"]}).encode()
    for number, (framing, _) in enumerate(SMUGGLED):
        target = f"/v1.41/containers/create?name={MARK}-smuggle-{number}"
        answer = hostile_gateway.raw(request(target, benign, crew.operator_token, framing))
        assert status_of(answer) == 400, answer
        assert b'"message"' in answer
    # A request hidden in the body of a smuggled one never runs either.
    inner = request(f"/v1.41/containers/create?name={MARK}-inner", benign, crew.operator_token)
    outer = (
        f"POST /v1.41/containers/{MARK}-x/wait HTTP/1.1\r\nHost: docker\r\n"
        f"X-Trustplane-Token: {crew.operator_token}\r\n"
        f"Content-Length: {len(inner)}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ).encode() + inner
    assert status_of(hostile_gateway.raw(outer)) == 400
    # A form body: dockerd (Go's ParseForm) would read networkmode=host from it.
    form = b"networkmode=host&remote=http://127.0.0.1:9/context.tar"
    answer = hostile_gateway.raw(
        request("/v1.41/build?t=x", form, crew.operator_token,
                extra=("Content-Type: application/x-www-form-urlencoded",))
    )  # fmt: skip
    assert status_of(answer) == 400, answer
    assert b"form bodies" in answer
    # Positive control: the same request with honest framing does reach dockerd.
    control = f"/v1.41/containers/create?name={MARK}-control"
    answer = hostile_gateway.raw(request(control, benign, crew.operator_token))
    assert status_of(answer) == 201, answer
    assert marked_containers(docker_client) == [f"{MARK}-control"]
    assert marked_events(docker_client, since) == [f"create {MARK}-control"]
    docker_client.containers.get(f"{MARK}-control").remove(force=True)


PATHS = [
    "/v1.41/containers/create",
    "/containers/create",
    "/v1.41/containers/../containers/create",
    "/v1.41/./containers/create",
    "/v1.41//containers/create",
    "/v1.41/containers/%2e%2e/containers/create",
    "/v1.41/%63ontainers/create",
    "/v1.41/containers%2fcreate",
    "/V1.41/containers/create",
    "/v1.23/containers/create",
    "/v1.41.0/containers/create",
    "/v01.41/containers/create",
    "/v1.41/Containers/Create",
    "/v1.41/containers/create/",
    "/v1.41/containers/json/../create",
]
BODIES = [
    {"HostConfig": {"Privileged": True}},
    {"Privileged": True},
    {"privileged": True, "HostConfig": {}},
    {"Binds": ["/:/host"]},
    {"PidMode": "host"},
    {"HostConfig": {"privileged": True}},
    {"hostconfig": {"PRIVILEGED": True}},
    {"HostConfig": {"Binds": ["/:/host"]}},
    {"HostConfig": {"Mounts": [{"Type": "bind", "Source": "/", "Target": "/h"}]}},
    {"HostConfig": {"PidMode": "host"}},
    {"HostConfig": {"NetworkMode": "host"}},
    {"HostConfig": {"CapAdd": ["ALL"]}},
    {"HostConfig": {"Devices": [{"PathOnHost": "/dev/mem", "PathInContainer": "/dev/mem"}]}},
]


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[str, bytes, str, tuple[str, ...]]:
    path = draw(st.sampled_from(PATHS))
    if draw(st.integers(0, 9)) == 0:
        body = draw(
            st.sampled_from(
                [b"{", b'{"Image": "x"', b"[]", b'"x"', b"\xff\xfe", b'{"Image": 1}', b"null"]
            )
        )
    else:
        document: dict[str, object] = dict(draw(st.sampled_from(BODIES)))
        document["Image"] = "trustplane/busybox:test-base"
        document["Cmd"] = ["true"]
        body = json.dumps(document).encode()
        if draw(st.booleans()):  # duplicate HostConfig: the later one is the harmless one
            body = body[:-1] + b', "HostConfig": {}}'
    framing = draw(
        st.sampled_from(["length", "length", "both", "double-length", "chunked-bad", "te-list"])
    )
    extra = tuple(
        draw(
            st.lists(
                st.sampled_from(
                    ["Host: other", "Expect: 100-continue", "Connection: close", "X-Foo: a\x01"]
                ),
                max_size=2,
            )
        )
    )
    return path, body, framing, extra


def test_generated_hostile_requests_never_reach_dockerd(
    hostile_gateway: RunningGateway, crew: People, docker_client: docker.DockerClient
) -> None:
    since = time.time()
    statuses: dict[int, int] = {}
    counter = iter(range(10**9))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=hostile_requests())
    def send(case: tuple[str, bytes, str, tuple[str, ...]]) -> None:
        path, body, framing, extra = case
        target = f"{path}?name={MARK}-gen-{next(counter)}"
        answer = hostile_gateway.raw(request(target, body, crew.operator_token, framing, extra))
        status = status_of(answer) if answer else 0
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (0, 400, 403, 404, 413), answer[:300]

    send()
    assert marked_containers(docker_client, f"{MARK}-gen") == []
    assert marked_events(docker_client, since, f"{MARK}-gen") == []
    assert sum(statuses.values()) >= EXAMPLES * 0.9, statuses
    assert statuses.get(403, 0) > 0, statuses  # refused by the body policy
    assert statuses.get(400, 0) > 0, statuses  # refused by the parser


def test_top_level_host_config_fields_are_refused(
    hostile_gateway: RunningGateway,
    crew: People,
    registered_base: str,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
) -> None:
    """dockerd reads `"Privileged": true` at the top level of a create body (deprecated
    embedded HostConfig): shown on dockerd directly, then refused through the gateway."""
    body = {"Image": registered_base, "Cmd": ["true"], "Privileged": True}
    direct = f"{MARK}-toplevel-direct"
    transport = httpx.HTTPTransport(uds=str(docker_daemon.socket))
    with httpx.Client(transport=transport, base_url="http://docker") as engine:
        created = engine.post("/v1.41/containers/create", params={"name": direct}, json=body)
        assert created.status_code == 201, created.text
    try:
        assert docker_client.containers.get(direct).attrs["HostConfig"]["Privileged"] is True
    finally:
        docker_client.containers.get(direct).remove(force=True)
    via = f"{MARK}-toplevel-gateway"
    answer = hostile_gateway.raw(
        request(f"/v1.41/containers/create?name={via}", json.dumps(body).encode(),
                crew.operator_token)
    )  # fmt: skip
    assert status_of(answer) == 403, answer
    assert b"privileged access" in answer
    assert marked_containers(docker_client, via) == []
