"""Image references in skopeo's transport syntax.

* `docker://HOST/REPO[:TAG|@DIGEST]`: a registry (Docker Hub rules for a
  missing host: `docker.io`, `library/` for one-component names);
* `oci:DIR[:TAG]`: an OCI image layout directory;
* `docker-daemon:NAME[:TAG]`: the local Docker engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from trustplane.errors import UsageError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_REF_NAME = re.compile(
    r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*"
)
"""The image layout spec's grammar for org.opencontainers.image.ref.name."""
_HOST = re.compile(r"(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")


@dataclass(frozen=True)
class RegistryRef:
    host: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag or DEFAULT_TAG}"
        return f"docker://{self.host}/{self.repository}{suffix}"


@dataclass(frozen=True)
class LayoutRef:
    path: Path
    tag: str | None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class DaemonRef:
    name: str
    """`repo:tag`, or an image id `sha256:...`."""

    def __str__(self) -> str:
        return f"docker-daemon:{self.name}"


ImageRef = RegistryRef | LayoutRef | DaemonRef


def parse(text: str) -> ImageRef:
    transport, sep, rest = text.partition(":")
    if not sep:
        raise UsageError(
            f"{text!r}: name a transport: docker://HOST/REPO:TAG, oci:DIR[:TAG] "
            "or docker-daemon:NAME:TAG"
        )
    if transport == "docker":
        if not rest.startswith("//"):
            raise UsageError(f"{text!r}: registry references start with docker://")
        return parse_registry(rest[2:])
    if transport == "oci":
        return _parse_layout(rest, text)
    if transport == "docker-daemon":
        return _parse_daemon(rest, text)
    raise UsageError(f"{text!r}: unknown transport {transport!r} (docker, oci, docker-daemon)")


def parse_registry(text: str) -> RegistryRef:
    name, digest = text, None
    if "@" in text:
        name, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise UsageError(f"{text!r}: invalid digest {digest!r}")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise UsageError(f"{text!r}: invalid tag {tag!r}")
    first, _, remainder = name.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        host, repository = first, remainder
    else:
        host, repository = DEFAULT_REGISTRY, name
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _HOST.fullmatch(host):
        raise UsageError(f"{text!r}: invalid registry host {host!r}")
    if not _REPOSITORY.fullmatch(repository):
        raise UsageError(
            f"{text!r}: invalid repository name {repository!r} (lower case, digits, ._-/)"
        )
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return RegistryRef(host=host, repository=repository, tag=tag, digest=digest)


def _parse_layout(rest: str, text: str) -> LayoutRef:
    # As skopeo does: the path ends at the first colon, and the rest is the
    # image's ref.name, which may itself hold colons (`oci:dir:busybox:1`).
    path, sep, tag = rest.partition(":")
    if not path:
        raise UsageError(f"{text!r}: oci: needs a directory")
    if sep and not _REF_NAME.fullmatch(tag):
        raise UsageError(f"{text!r}: invalid tag {tag!r}")
    return LayoutRef(path=Path(path), tag=tag if sep else None)


def _parse_daemon(rest: str, text: str) -> DaemonRef:
    if not rest:
        raise UsageError(f"{text!r}: docker-daemon: needs an image name")
    if rest.startswith("sha256:"):
        if not _DIGEST.fullmatch(rest):
            raise UsageError(f"{text!r}: invalid image id")
        return DaemonRef(name=rest)
    last = rest.rsplit("/", 1)[-1]
    name = rest if ":" in last or "@" in last else f"{rest}:{DEFAULT_TAG}"
    return DaemonRef(name=name)
