"""Image references in skopeo's transport syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustplane.errors import UsageError
from trustplane.oci.reference import DaemonRef, LayoutRef, RegistryRef, parse, parse_registry

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "host", "repository", "tag", "digest"),
    [
        ("docker://busybox", "docker.io", "library/busybox", "latest", None),
        ("docker://busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("docker://user/app", "docker.io", "user/app", "latest", None),
        ("docker://docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
        ("docker://localhost/app", "localhost", "app", "latest", None),
        ("docker://localhost:5000/a/b/c:v1.2-rc_3", "localhost:5000", "a/b/c", "v1.2-rc_3", None),
        ("docker://127.0.0.1:5000/app:x", "127.0.0.1:5000", "app", "x", None),
        ("docker://[::1]:5000/app", "[::1]:5000", "app", "latest", None),
        (
            "docker://reg.example.com/ns/my-app__x.y",
            "reg.example.com",
            "ns/my-app__x.y",
            "latest",
            None,
        ),
        (f"docker://reg.io/app@{DIGEST}", "reg.io", "app", None, DIGEST),
        (f"docker://reg.io/app:1.0@{DIGEST}", "reg.io", "app", "1.0", DIGEST),
        ("docker://Reg.IO:443/app", "Reg.IO:443", "app", "latest", None),
    ],
)
def test_registry_references(
    text: str, host: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse(text)
    assert ref == RegistryRef(host=host, repository=repository, tag=tag, digest=digest)


def test_registry_reference_and_string_form() -> None:
    tagged = parse("docker://busybox")
    assert isinstance(tagged, RegistryRef)
    assert tagged.reference == "latest"
    assert str(tagged) == "docker://docker.io/library/busybox:latest"
    pinned = parse(f"docker://reg.io/app:1.0@{DIGEST}")
    assert isinstance(pinned, RegistryRef)
    assert pinned.reference == DIGEST  # the digest wins over the tag
    assert str(pinned) == f"docker://reg.io/app@{DIGEST}"
    assert parse(str(pinned)) == RegistryRef("reg.io", "app", None, DIGEST)


def test_parse_registry_without_transport() -> None:
    assert parse_registry("localhost:5000/app:1") == RegistryRef("localhost:5000", "app", "1", None)


@pytest.mark.parametrize(
    ("text", "path", "tag"),
    [
        ("oci:/tmp/layout", "/tmp/layout", None),
        ("oci:/tmp/layout:v1", "/tmp/layout", "v1"),
        ("oci:relative/dir:latest", "relative/dir", "latest"),
        ("oci:dir", "dir", None),
        ("oci:dir:docker.io/library/busybox:1.36", "dir", "docker.io/library/busybox:1.36"),
    ],
)
def test_layout_references(text: str, path: str, tag: str | None) -> None:
    ref = parse(text)
    assert ref == LayoutRef(path=Path(path), tag=tag)
    assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("docker-daemon:busybox:1.36", "busybox:1.36"),
        ("docker-daemon:busybox", "busybox:latest"),
        ("docker-daemon:localhost:5000/app", "localhost:5000/app:latest"),
        ("docker-daemon:localhost:5000/app:v2", "localhost:5000/app:v2"),
        (f"docker-daemon:{DIGEST}", DIGEST),
    ],
)
def test_daemon_references(text: str, name: str) -> None:
    ref = parse(text)
    assert ref == DaemonRef(name=name)
    assert str(ref) == f"docker-daemon:{name}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("busybox", "name a transport"),
        ("", "name a transport"),
        ("docker:busybox", "start with docker://"),
        ("ftp://host/x", "unknown transport 'ftp'"),
        ("containers-storage:x", "unknown transport"),
        ("docker://", "invalid repository name"),
        ("docker://Busybox", "invalid repository name"),
        ("docker://reg.io/App", "invalid repository name"),
        ("docker://reg.io/app/", "invalid repository name"),
        ("docker://reg.io//app", "invalid repository name"),
        ("docker://reg.io/-app", "invalid repository name"),
        ("docker://reg.io/app:-bad", "invalid tag '-bad'"),
        ("docker://reg.io/app:" + "t" * 129, "invalid tag"),
        ("docker://reg.io/app:", "invalid tag ''"),
        ("docker://reg.io/app@sha256:abc", "invalid digest"),
        ("docker://reg.io/app@md5:" + "0" * 32, "invalid digest"),
        ("docker://reg.io/app@" + DIGEST.upper(), "invalid digest"),
        ("docker://bad_host.io:x/app", "invalid registry host"),
        ("oci:", "needs a directory"),
        ("oci:/tmp/x:-bad", "invalid tag"),
        ("docker-daemon:", "needs an image name"),
        ("docker-daemon:sha256:abc", "invalid image id"),
    ],
)
def test_bad_references_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as info:
        parse(text)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_longest_tag_is_accepted() -> None:
    ref = parse("docker://reg.io/app:" + "t" * 128)
    assert isinstance(ref, RegistryRef)
    assert ref.tag == "t" * 128
