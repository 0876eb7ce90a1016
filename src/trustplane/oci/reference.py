"""Image names and references: Docker's normalisation, written once, and skopeo's transports.

Every component that compares image names (the gateway's registered-image and
signature checks, the control plane's registration and lookups, signing's
docker-reference, the node agent) asks `normalize` here, so two of them can
never disagree about which image a name means. The rules are Docker's
(distribution/reference's ParseNormalizedNamed), with two stricter choices:

* a name is `[DOMAIN/]PATH[:TAG][@DIGEST]`; the first `/`-component is the
  registry DOMAIN when it is `localhost`, contains `.` or `:` (a host name, an
  IPv4 address, `host:port`, `[IPv6]:port`) or has an upper-case letter;
  otherwise the registry is Docker Hub, `docker.io`, and a one-component PATH
  gets `library/` (`busybox` = `docker.io/library/busybox`);
* `index.docker.io` (Docker's legacy name) and `registry-1.docker.io` (the
  Hub registry's real host) are `docker.io`;
* PATH is lower case: components of `[a-z0-9]` joined by `.`, `_`, `__` or
  dashes; a bare 64-hex-digit name is refused (it reads as an image id); the
  whole DOMAIN/PATH is at most 255 characters; TAG is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`;
  a TAG and a DIGEST may come together (the digest pins);
* stricter: the DOMAIN is lower-cased (host names are case-insensitive, so
  `REG.example/app` and `reg.example/app` are one image), and a domain that
  is one only by its capitals (`Foo/app`) is refused: in lower case it would
  be a Docker Hub namespace;
* stricter: digests are `sha256:` + 64 lower-case hex digits.

`ImageName.name` is the canonical spelling trustplane stores, compares and
authorizes (`image:NAME` in the policy): Docker's familiar name (`busybox`,
`shop/app`, `registry.example/shop/app`), except where the familiar form would
read back as another image (`docker.io/localhost/x` is not `localhost/x`), which
keeps the full name. `normalize(x.name).name == x.name` for every name.

Transports (skopeo's syntax):

* `docker://NAME`: a registry;
* `oci:DIR[:TAG]`: an OCI image layout directory;
* `docker-daemon:NAME[:TAG]`: the local Docker engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from trustplane.errors import UsageError

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"
MAX_NAME = 255
"""Characters of DOMAIN/PATH (distribution's NameTotalLengthMax)."""

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_REF_NAME = re.compile(
    r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*"
)
"""The image layout spec's grammar for org.opencontainers.image.ref.name."""


@dataclass(frozen=True)
class RegistryRef:
    """A normalised image reference: registry host, repository path, tag and digest."""

    host: str
    """The registry, lower case; `docker.io` for Docker Hub."""
    repository: str
    """The repository's path at the registry (`library/busybox`)."""
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def full_name(self) -> str:
        """HOST/PATH, Docker's fully qualified name (`docker.io/library/busybox`)."""
        return f"{self.host}/{self.repository}"

    @property
    def name(self) -> str:
        """The canonical name of the repository (see the module's docstring)."""
        return canonical_name(self.host, self.repository)

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag or DEFAULT_TAG}"
        return f"docker://{self.full_name}{suffix}"


ImageName = RegistryRef
"""A name as the gateway and the control plane compare it: the same normalised value."""


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


def normalize(text: str) -> ImageName:
    """`[DOMAIN/]PATH[:TAG][@DIGEST]` by Docker's rules (module docstring); UsageError if invalid.

    No tag and no digest stays so (`tag` None): a registry pull adds
    `latest` itself (`RegistryRef.reference`).
    """
    name, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise UsageError(f"{text!r}: invalid digest {digest!r} (sha256: and 64 hex digits)")
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise UsageError(f"{text!r}: invalid tag {tag!r}")
    if _IMAGE_ID.fullmatch(name):
        raise UsageError(f"{text!r}: 64 hex digits are an image id, not a repository name")
    domain, path = _split_domain(name, text)
    if not _PATH.fullmatch(path):
        raise UsageError(f"{text!r}: invalid repository name {path!r} (lower case, digits, ._-/)")
    if len(domain) + 1 + len(path) > MAX_NAME:
        raise UsageError(f"{text[:80]!r}...: names are at most {MAX_NAME} characters")
    return RegistryRef(host=domain, repository=path, tag=tag, digest=digest or None)


def canonical(text: str) -> str:
    """The canonical name of the repository `text` names, tag and digest dropped."""
    return normalize(text).name


def repository_name(text: str) -> str:
    """The canonical name of a repository given without tag or digest (API input)."""
    ref = normalize(text)
    if ref.tag is not None or ref.digest is not None:
        raise UsageError(f"{text!r}: name a repository, without :TAG or @DIGEST")
    return ref.name


def same_repository(a: str, b: str) -> bool:
    """Do `a` and `b` name one repository? False when either is not a valid name."""
    try:
        return canonical(a) == canonical(b)
    except UsageError:
        return False


def canonical_name(domain: str, path: str) -> str:
    """The shortest spelling of DOMAIN/PATH that normalises back to it."""
    candidates = []
    if domain == DEFAULT_REGISTRY:
        if path.startswith(OFFICIAL_PREFIX) and "/" not in path[len(OFFICIAL_PREFIX) :]:
            candidates.append(path[len(OFFICIAL_PREFIX) :])
        candidates.append(path)
    for candidate in candidates:
        try:
            named = normalize(candidate)
        except UsageError:
            continue
        if (named.host, named.repository) == (domain, path):
            return candidate
    return f"{domain}/{path}"


def parse_registry(text: str) -> RegistryRef:
    """A `docker://` reference: `normalize`, with `latest` when neither tag nor digest is given."""
    ref = normalize(text)
    if ref.tag is None and ref.digest is None:
        return RegistryRef(ref.host, ref.repository, DEFAULT_TAG, None)
    return ref


def _split_domain(name: str, text: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if not slash:
        return DEFAULT_REGISTRY, OFFICIAL_PREFIX + name
    lowered = first.lower()
    if lowered != "localhost" and "." not in first and ":" not in first:
        if lowered == first:
            return DEFAULT_REGISTRY, _official(name)  # a Docker Hub namespace
        raise UsageError(
            f"{text!r}: {first!r} is a registry host only by its capital letters; "
            "name the registry in lower case with a dot or a port"
        )
    if not _DOMAIN.fullmatch(first):
        raise UsageError(f"{text!r}: invalid registry host {first!r}")
    domain = DEFAULT_REGISTRY if lowered in DOCKER_HUB_ALIASES else lowered
    return domain, _official(rest) if domain == DEFAULT_REGISTRY else rest


def _official(path: str) -> str:
    return path if "/" in path else OFFICIAL_PREFIX + path


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
