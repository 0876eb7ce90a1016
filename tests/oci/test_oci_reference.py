"""Image references in skopeo's transport syntax."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustplane.errors import UsageError
from trustplane.oci.reference import (
    DaemonRef,
    LayoutRef,
    RegistryRef,
    canonical,
    normalize,
    parse,
    parse_registry,
    repository_name,
    same_repository,
)

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
        ("docker://Reg.IO:443/app", "reg.io:443", "app", "latest", None),
        ("docker://index.docker.io/busybox", "docker.io", "library/busybox", "latest", None),
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


# -- Docker's normalisation (distribution/reference's rules, see oci/reference.py) ----------

HEX64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"


@pytest.mark.parametrize(
    ("text", "host", "path", "name"),
    [
        # Docker Hub: default registry, library/ for one component, every alias.
        ("busybox", "docker.io", "library/busybox", "busybox"),
        ("library/busybox", "docker.io", "library/busybox", "busybox"),
        ("docker.io/busybox", "docker.io", "library/busybox", "busybox"),
        ("docker.io/library/busybox", "docker.io", "library/busybox", "busybox"),
        ("index.docker.io/busybox", "docker.io", "library/busybox", "busybox"),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "busybox"),
        ("registry-1.docker.io/library/busybox", "docker.io", "library/busybox", "busybox"),
        ("registry-1.docker.io/busybox", "docker.io", "library/busybox", "busybox"),
        ("DOCKER.IO/busybox", "docker.io", "library/busybox", "busybox"),
        ("shop/app", "docker.io", "shop/app", "shop/app"),
        ("docker.io/shop/app", "docker.io", "shop/app", "shop/app"),
        ("index.docker.io/shop/app", "docker.io", "shop/app", "shop/app"),
        ("library/foo/bar", "docker.io", "library/foo/bar", "library/foo/bar"),
        ("docker.io/library/foo/bar", "docker.io", "library/foo/bar", "library/foo/bar"),
        ("store/foo/bar", "docker.io", "store/foo/bar", "store/foo/bar"),
        ("other/library", "docker.io", "other/library", "other/library"),
        ("test_com/foo", "docker.io", "test_com/foo", "test_com/foo"),
        ("docker---rules/docker", "docker.io", "docker---rules/docker", "docker---rules/docker"),
        ("dock__er/docker", "docker.io", "dock__er/docker", "dock__er/docker"),
        ("d/docker", "docker.io", "d/docker", "d/docker"),
        # A single component is always a Docker Hub name, even one that looks like a host.
        ("localhost", "docker.io", "library/localhost", "localhost"),
        ("example.com", "docker.io", "library/example.com", "example.com"),
        # Hub names whose familiar form would read as a registry keep the full name.
        ("docker.io/localhost/x", "docker.io", "localhost/x", "docker.io/localhost/x"),
        ("index.docker.io/localhost/x", "docker.io", "localhost/x", "docker.io/localhost/x"),
        ("docker.io/foo.com/x", "docker.io", "foo.com/x", "docker.io/foo.com/x"),
        (f"docker.io/{HEX64}", "docker.io", f"library/{HEX64}", f"library/{HEX64}"),
        # Registries: localhost, a dot, a colon (port or IPv6), any case (lower-cased).
        ("localhost/x", "localhost", "x", "localhost/x"),
        ("localhost:5000/x", "localhost:5000", "x", "localhost:5000/x"),
        ("LOCALHOST/x", "localhost", "x", "localhost/x"),
        ("test.com/foo", "test.com", "foo", "test.com/foo"),
        ("test.com:8080/foo", "test.com:8080", "foo", "test.com:8080/foo"),
        ("test-com:8080/foo", "test-com:8080", "foo", "test-com:8080/foo"),
        ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", "xn--n3h.com:18080/foo"),
        (
            "127.0.0.1:5000/library/debian",
            "127.0.0.1:5000",
            "library/debian",
            "127.0.0.1:5000/library/debian",
        ),
        ("192.168.0.1:8/debian", "192.168.0.1:8", "debian", "192.168.0.1:8/debian"),
        ("[fc00::1]:5000/docker", "[fc00::1]:5000", "docker", "[fc00::1]:5000/docker"),
        (
            "[FC00:1:2:3:4:5:6:7]:5000/library/debian",
            "[fc00:1:2:3:4:5:6:7]:5000",
            "library/debian",
            "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
        ),
        ("[::1]:5000/app", "[::1]:5000", "app", "[::1]:5000/app"),
        (
            "Example.COM/private/moonbase",
            "example.com",
            "private/moonbase",
            "example.com/private/moonbase",
        ),
        ("example.com/library/x", "example.com", "library/x", "example.com/library/x"),
        ("docker.io.example/x", "docker.io.example", "x", "docker.io.example/x"),
    ],
)
def test_normalisation_table(text: str, host: str, path: str, name: str) -> None:
    named = normalize(text)
    assert (named.host, named.repository, named.name) == (host, path, name)
    assert named.full_name == f"{host}/{path}"
    assert (named.tag, named.digest) == (None, None)
    # The canonical name and the full name both read back as the same image.
    for spelling in (named.name, named.full_name):
        again = normalize(spelling)
        assert (again.host, again.repository) == (host, path)


@pytest.mark.parametrize(
    ("text", "name", "tag", "digest"),
    [
        ("busybox:1.36", "busybox", "1.36", None),
        (f"busybox@{DIGEST}", "busybox", None, DIGEST),
        (f"busybox:latest@{DIGEST}", "busybox", "latest", DIGEST),
        (f"docker.io/library/busybox:1@{DIGEST}", "busybox", "1", DIGEST),
        ("localhost:5000/a/b:v1.2-rc_3", "localhost:5000/a/b", "v1.2-rc_3", None),
        ("[::1]:5000/app:v1", "[::1]:5000/app", "v1", None),
        ("127.0.0.1:5000/app:_under", "127.0.0.1:5000/app", "_under", None),
        ("app:" + "T" * 128, "app", "T" * 128, None),
        ("localhost:5000", "localhost", "5000", None),  # one component: a Hub name and a tag
    ],
)
def test_tags_and_digests(text: str, name: str, tag: str | None, digest: str | None) -> None:
    named = normalize(text)
    assert (named.name, named.tag, named.digest) == (name, tag, digest)
    assert canonical(text) == name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid repository name"),
        ("https://github.com/docker/docker", "invalid"),
        ("docker/Docker", "invalid repository name"),
        ("docker.io/docker/Docker", "invalid repository name"),
        ("Busybox", "invalid repository name"),
        ("-docker", "invalid repository name"),
        ("-docker/docker", "invalid repository name"),
        ("docker-/docker", "invalid repository name"),
        ("-docker.io/docker/docker", "invalid registry host"),
        ("docker///docker", "invalid repository name"),
        ("docker.io/docker///docker", "invalid repository name"),
        ("____/____", "invalid repository name"),
        ("_docker/_docker", "invalid repository name"),
        ("dock..er/docker", "invalid registry host"),
        ("dock_.er/docker", "invalid registry host"),
        ("docker/", "invalid repository name"),
        ("[fc00::1]", "invalid"),
        ("[fc00::1]:5000", "invalid repository name"),
        ("fc00::1:5000/debian", "invalid registry host"),
        ("[fe80::1%eth0]:5000/debian", "invalid registry host"),
        ("[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid registry host"),
        ("bad_host.io:x/app", "invalid registry host"),
        (HEX64, "image id"),
        (f"{HEX64}:tag", "image id"),
        ("a" * 120 + "/" + "b" * 140, "at most 255"),
        ("example.com/" + "b" * 244, "at most 255"),
        ("app:-bad", "invalid tag"),
        ("app:", "invalid tag"),
        ("app:é", "invalid tag"),
        ("app:" + "t" * 129, "invalid tag"),
        ("app@sha256:abc", "invalid digest"),
        ("app@" + DIGEST.upper(), "invalid digest"),
        ("app@md5:" + "0" * 32, "invalid digest"),
        # A domain only by its capitals would be a Hub namespace in lower case: refused.
        ("Foo/bar", "only by its capital letters"),
        ("DOCKER/docker", "only by its capital letters"),
    ],
)
def test_invalid_names(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        normalize(text)
    assert "\n" not in str(info.value)


def test_longest_name_is_accepted() -> None:
    named = normalize("example.com/" + "b" * 243)
    assert len(named.full_name) == 255


def test_names_the_old_code_resolved_differently() -> None:
    """Pairs a hostile client may pick: each pair is two images, or one, never ambiguous."""
    assert canonical("localhost/x") != canonical("docker.io/localhost/x")
    assert canonical("registry-1.docker.io/library/x") == canonical("x")
    assert canonical("index.docker.io/x") == canonical("docker.io/library/x") == "x"
    assert canonical("REG.example/app") == canonical("reg.example/app")
    assert canonical("library/x") == canonical("x")
    assert canonical("example.com/library/x") != canonical("x")
    assert same_repository("busybox:1", f"docker.io/library/busybox@{DIGEST}")
    assert not same_repository("localhost/x", "docker.io/localhost/x")
    assert not same_repository("x", "Not A Name")


def test_repository_name_refuses_tags_and_digests() -> None:
    assert repository_name("docker.io/library/busybox") == "busybox"
    for text in ("busybox:1", f"busybox@{DIGEST}"):
        with pytest.raises(UsageError, match="without :TAG or @DIGEST"):
            repository_name(text)


_component = st.from_regex(r"[a-z0-9]{1,4}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,3}){0,2}", fullmatch=True)
_domain = st.sampled_from(
    [
        "",
        "docker.io/",
        "index.docker.io/",
        "registry-1.docker.io/",
        "localhost/",
        "LocalHost:5000/",
        "Reg.Example/",
        "127.0.0.1:5000/",
        "[::1]:443/",
        "foo.com/",
    ]
)


@given(_domain, st.lists(_component, min_size=1, max_size=3))
def test_canonical_names_are_fixed_points(domain: str, components: list[str]) -> None:
    """normalize(x.name) names x again, whatever spelling x came from."""
    text = domain + "/".join(components)
    try:
        named = normalize(text)
    except UsageError:
        return  # e.g. a 64-hex name; refusing is always safe
    again = normalize(named.name)
    assert (again.host, again.repository) == (named.host, named.repository)
    assert again.name == named.name


@given(st.text(max_size=300))
def test_any_text_is_a_name_or_a_usage_error(text: str) -> None:
    """What a client sends never breaks the normaliser: a name, or one clear refusal."""
    try:
        named = normalize(text)
    except UsageError as exc:
        refusal = str(exc)
    else:
        assert normalize(named.name).name == named.name
        return
    assert "\n" not in refusal
