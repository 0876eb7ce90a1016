"""Host access: what is refused, and what ordinary containers keep."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trustplane.errors import Forbidden, MalformedError
from trustplane.gateway.host_access import host_access
from trustplane.gateway.image_auth import reference_name
from trustplane.gateway.request import parse_target

CREATE = parse_target("POST", "/v1.41/containers/create")


def wanted(host_config: dict[str, Any]) -> set[str]:
    body = json.dumps({"Image": "busybox", "HostConfig": host_config}).encode()
    return host_access("create", CREATE, body)[0]


def test_ordinary_containers_pass() -> None:
    assert wanted({}) == set()
    assert wanted({"Binds": ["data:/data", "cache:/cache:ro"]}) == set()  # named volumes
    assert wanted({"Mounts": [{"Type": "volume", "Source": "v", "Target": "/v"}]}) == set()
    assert wanted({"Mounts": [{"Type": "tmpfs", "Target": "/t"}]}) == set()
    assert wanted({"NetworkMode": "bridge", "PidMode": "container:other"}) == set()
    assert wanted({"CapDrop": ["ALL"], "Devices": [], "CapAdd": None}) == set()
    assert host_access("none", CREATE, b"") == (set(), {})


def test_each_category_is_seen() -> None:
    assert wanted({"Binds": ["/var/run/docker.sock:/s"]}) == {"host-bind"}
    assert wanted({"VolumesFrom": ["other"]}) == {"host-bind"}
    assert wanted({"Mounts": [{"Type": "npipe", "Source": "x", "Target": "/x"}]}) == {"host-bind"}
    volume_with_options = {
        "Type": "volume",
        "Target": "/x",
        "VolumeOptions": {"DriverConfig": {"Options": {"device": "/", "o": "bind"}}},
    }
    assert wanted({"Mounts": [volume_with_options]}) == {"host-bind"}
    assert wanted({"UTSMode": "host", "CgroupnsMode": "HOST"}) == {"host-namespace"}
    assert wanted({"DeviceCgroupRules": ["c 1:3 rwm"]}) == {"devices"}
    assert wanted({"ReadonlyPaths": []}) == {"security-opt"}
    exec_target = parse_target("POST", "/containers/web/exec")
    assert host_access("exec", exec_target, b'{"Privileged": true, "Cmd": ["sh"]}')[0] == {
        "privileged"
    }
    update = parse_target("POST", "/containers/web/update")
    assert host_access("update", update, b'{"Devices": [{"PathOnHost": "/dev/kmsg"}]}')[0] == {
        "devices"
    }
    volume = parse_target("POST", "/volumes/create")
    assert host_access("volume", volume, b'{"Name": "v", "DriverOpts": {"o": "bind"}}')[0] == {
        "host-bind"
    }
    assert host_access("volume", volume, b'{"Name": "v"}')[0] == set()
    build = parse_target("POST", "/build?networkmode=HOST&t=x")
    assert host_access("build", build, b"")[0] == {"host-namespace"}


def test_bodies_on_calls_that_take_none_are_refused() -> None:
    start = parse_target("POST", "/v1.41/containers/web/start")
    with pytest.raises(MalformedError):
        host_access("none", start, b'{"Privileged": true}')


def test_references() -> None:
    digest = "sha256:" + "ab" * 32
    assert reference_name("busybox") == ("busybox", None)
    assert reference_name("docker.io/library/busybox:1") == ("busybox", None)
    assert reference_name("registry-1.docker.io/library/busybox") == ("busybox", None)
    assert reference_name("localhost/x") == ("localhost/x", None)
    assert reference_name("docker.io/localhost/x") == ("docker.io/localhost/x", None)
    assert reference_name("127.0.0.1:5000/a/b:v1") == ("127.0.0.1:5000/a/b", None)
    assert reference_name(f"127.0.0.1:5000/a/b@{digest}") == ("127.0.0.1:5000/a/b", digest)
    with pytest.raises(Forbidden, match="invalid digest"):
        reference_name("127.0.0.1:5000/a/b@sha256:ab")  # never guessed at
    with pytest.raises(Forbidden, match="invalid repository name"):
        reference_name("Busybox")


def test_host_config_fields_at_the_top_level_are_seen() -> None:
    """dockerd 20.10 reads HostConfig fields at the top level of a create body too."""
    for fields, category in (
        ({"Privileged": True}, "privileged"),
        ({"privileged": True, "HostConfig": {}}, "privileged"),
        ({"Binds": ["/:/h"]}, "host-bind"),
        ({"PidMode": "host"}, "host-namespace"),
        ({"CapAdd": ["ALL"]}, "capabilities"),
    ):
        body = json.dumps({"Image": "busybox", **fields}).encode()
        assert category in host_access("create", CREATE, body)[0], fields


def test_networks_and_volume_drivers_reaching_the_host_are_seen() -> None:
    network = parse_target("POST", "/v1.41/networks/create")
    for body, expected in (
        (b'{"Name": "n"}', set()),
        (b'{"Name": "n", "Driver": "bridge"}', set()),
        (b'{"Name": "n", "Driver": "macvlan", "Options": {"parent": "eth0"}}', {"host-namespace"}),
        (b'{"Name": "n", "Driver": "ipvlan"}', {"host-namespace"}),
    ):
        assert host_access("network", network, body)[0] == expected, body
    assert wanted({"VolumeDriver": "some-plugin"}) == {"host-bind"}
    assert wanted({"VolumeDriver": "local"}) == set()


def test_trustplane_volumes_are_named_volumes_not_host_binds() -> None:
    """The trustplane driver's volumes are encrypted control-plane volumes: with its own
    options (type, size) they reach no host path; any other option, or any other driver,
    is a host bind."""
    volume = parse_target("POST", "/volumes/create")
    for body, expected in (
        (b'{"Name": "v", "Driver": "trustplane", "DriverOpts": {"type": "t", "size": "1G"}}',
         set()),
        (b'{"Name": "v", "Driver": "trustplane"}', set()),
        (b'{"Name": "v", "Driver": "trustplane", "DriverOpts": {"device": "/etc"}}',
         {"host-bind"}),
        (b'{"Name": "v", "Driver": "local", "DriverOpts": {"type": "t"}}', {"host-bind"}),
        (b'{"Name": "v", "Driver": "trustplane-evil"}', {"host-bind"}),
    ):  # fmt: skip
        assert host_access("volume", volume, body)[0] == expected, body
    assert wanted({"VolumeDriver": "trustplane", "Binds": ["v1:/data"]}) == set()
    mount = {
        "Type": "volume", "Source": "v1", "Target": "/data",
        "VolumeOptions": {"DriverConfig": {"Name": "trustplane", "Options": {"size": "1G"}}},
    }  # fmt: skip
    assert wanted({"Mounts": [mount]}) == set()
    mount["VolumeOptions"] = {"DriverConfig": {"Name": "trustplane", "Options": {"o": "bind"}}}
    assert wanted({"Mounts": [mount]}) == {"host-bind"}
