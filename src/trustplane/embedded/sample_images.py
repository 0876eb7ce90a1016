"""Test images made on this machine, with no registry and no internet.

The base image is BusyBox from the Debian package busybox-static: one static
binary plus a symlink per applet, fed to `docker import` as an in-memory tar.
Further images are built from it with the Engine's classic builder (no
buildx), again from an in-memory build context.

Both are idempotent: each image carries a label with the digest of what it
was made from, and an existing tag with the same digest is reused.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import docker
import docker.errors

from trustplane.embedded.process import require_binary
from trustplane.errors import UnavailableError, UsageError

BASE_TAG = "trustplane/busybox:base"
CONTENT_LABEL = "org.trustplane.content-digest"
# A fixed mtime makes the tar, and so its digest and the layer's diff_id, reproducible.
_MTIME = 1_600_000_000
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ETC_FILES = {
    "etc/passwd": (
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    ),
    "etc/group": b"root:x:0:\nnobody:x:65534:\n",
}
_DIRS = {
    "bin": 0o755,
    "sbin": 0o755,
    "usr": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "etc": 0o755,
    "root": 0o700,
    "tmp": 0o1777,
    "var": 0o755,
    "var/tmp": 0o1777,
    "home": 0o755,
}
_IMPORT_CHANGES = (f"ENV PATH={_PATH}", 'CMD ["/bin/sh"]')


def busybox_rootfs_tar(busybox: Path | None = None) -> bytes:
    """A root file system tar: /bin/busybox, a symlink for every applet, /etc, /tmp.

    Applets go where `busybox --list-full` says (/bin/sh, /usr/bin/env, ...)
    so that scripts with the usual paths work.
    """
    binary = busybox or Path(require_binary("busybox", "busybox-static"))
    applets = _applet_paths(binary)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in sorted(_DIRS.items()):
            tar.addfile(_tarinfo(name, tarfile.DIRTYPE, mode))
        data = binary.read_bytes()
        info = _tarinfo("bin/busybox", tarfile.REGTYPE, 0o755)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, content in sorted(_ETC_FILES.items()):
            info = _tarinfo(name, tarfile.REGTYPE, 0o644)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for applet in applets:
            info = _tarinfo(applet, tarfile.SYMTYPE, 0o777)
            info.linkname = "/bin/busybox"
            tar.addfile(info)
    return buf.getvalue()


def import_busybox_base(client: docker.DockerClient, tag: str = BASE_TAG) -> str:
    """Make (or reuse) the BusyBox base image under `tag`; return its image id."""
    rootfs = busybox_rootfs_tar()
    digest = _digest([rootfs, *(c.encode() for c in _IMPORT_CHANGES)])
    existing = _image_with_digest(client, tag, digest)
    if existing is not None:
        return existing
    repository, image_tag = split_tag(tag)
    try:
        client.api.import_image_from_data(
            rootfs,
            repository=repository,
            tag=image_tag,
            changes=[*_IMPORT_CHANGES, f"LABEL {CONTENT_LABEL}={digest}"],
        )
        image_id: str = client.images.get(tag).id
    except docker.errors.DockerException as exc:
        raise UnavailableError(f"docker import of {tag} failed: {exc}") from exc
    return image_id


def build_image(
    client: docker.DockerClient, tag: str, dockerfile: str, files: Mapping[str, bytes]
) -> str:
    """Build `dockerfile` with `files` as build context (or reuse); return the image id.

    The reuse check covers the Dockerfile, the files and the ids of the FROM
    images, so rebuilding a base rebuilds what is built on it.
    """
    if "Dockerfile" in files:
        raise UsageError("pass the Dockerfile as `dockerfile`, not as a context file")
    context = build_context_tar(dockerfile, files)
    bases = [f"{name}={_image_id_or_missing(client, name)}" for name in _from_images(dockerfile)]
    digest = _digest([context, *(b.encode() for b in bases)])
    existing = _image_with_digest(client, tag, digest)
    if existing is not None:
        return existing
    try:
        image, _logs = client.images.build(
            fileobj=io.BytesIO(context),
            custom_context=True,
            tag=tag,
            labels={CONTENT_LABEL: digest},
            rm=True,
            forcerm=True,
            pull=False,
        )
    except docker.errors.BuildError as exc:
        lines = [
            str(chunk.get("stream") or chunk.get("error") or "").rstrip()
            for chunk in exc.build_log
            if isinstance(chunk, dict)
        ]
        tail = "\n".join(line for line in lines if line)[-2000:]
        raise UnavailableError(f"docker build of {tag} failed: {exc.msg}\n{tail}") from exc
    except docker.errors.DockerException as exc:
        raise UnavailableError(f"docker build of {tag} failed: {exc}") from exc
    image_id: str = image.id
    return image_id


def build_context_tar(dockerfile: str, files: Mapping[str, bytes]) -> bytes:
    """An in-memory build context: the Dockerfile plus `files` (relative paths)."""
    buf = io.BytesIO()
    entries = {"Dockerfile": dockerfile.encode("utf-8"), **files}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(entries.items()):
            clean = name.lstrip("/")
            if not clean or ".." in Path(clean).parts:
                raise UsageError(f"build context path {name!r} must stay inside the context")
            info = _tarinfo(clean, tarfile.REGTYPE, 0o644)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def split_tag(reference: str) -> tuple[str, str]:
    """("repo", "tag") of "repo:tag"; a registry port is not a tag; no tag means latest."""
    name, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        return reference, "latest"
    return name, tag


def _applet_paths(binary: Path) -> list[str]:
    out = subprocess.run(
        [str(binary), "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    paths = {line.strip().lstrip("/") for line in out.splitlines() if line.strip()}
    paths.discard("bin/busybox")
    return sorted(p for p in paths if p.split("/")[0] in {"bin", "sbin", "usr"})


def _tarinfo(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return "sha256:" + h.hexdigest()


def _image_with_digest(client: docker.DockerClient, tag: str, digest: str) -> str | None:
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.DockerException as exc:
        raise UnavailableError(f"cannot inspect image {tag}: {exc}") from exc
    labels = image.labels or {}
    if labels.get(CONTENT_LABEL) == digest:
        image_id: str = image.id
        return image_id
    return None


def _image_id_or_missing(client: docker.DockerClient, name: str) -> str:
    try:
        image_id: str = client.images.get(name).id
    except docker.errors.ImageNotFound:
        return "missing"
    return image_id


def _from_images(dockerfile: str) -> list[str]:
    """Images named by FROM lines, without `scratch` and earlier stage names."""
    stages: set[str] = set()
    images: list[str] = []
    for raw in dockerfile.splitlines():
        words = raw.split()
        if not words or words[0].upper() != "FROM":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if not args:
            continue
        image = args[0]
        if len(args) >= 3 and args[1].upper() == "AS":
            stages.add(args[2].lower())
        if image.lower() != "scratch" and image.lower() not in stages:
            images.append(image)
    return images


APP_SECRET_PATH = "/secrets/token"  # noqa: S105 - a path, not a password
APP_CONFIG_PATH = "/app/config.txt"
_APP_DOCKERFILE = """FROM {base}
COPY app/ /app/
ENV APP_MODE=demo
COPY secrets/ /secrets/
CMD ["/bin/sh", "/app/run.sh"]
"""
_APP_RUN = b"""#!/bin/sh
echo "config: $(cat /app/config.txt)"
if [ -r /secrets/token ]; then echo "secret: $(cat /secrets/token)"; else echo "secret: none"; fi
"""


def build_app_image(client: docker.DockerClient, base: str, tag: str, secret: bytes) -> str:
    """Three layers: the public base (0), a public app (1), a secret (2).

    The layer order is the point: a lower-tier key sees the app but not the
    secret, and `path:/secrets/**` selects exactly layer 2.
    """
    files = {
        "app/run.sh": _APP_RUN,
        "app/config.txt": b"greeting=hello from the public app layer\n",
        "secrets/token": secret,
    }
    return build_image(client, tag, _APP_DOCKERFILE.format(base=base), files)
