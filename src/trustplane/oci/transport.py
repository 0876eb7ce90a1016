"""Where images come from and go to: a registry, an OCI layout, Docker.

Every source gives the top-level manifest and streams blobs; callers verify
what they read. Every destination stages what it receives and makes the image
appear only at `commit` (the manifest is the last thing written), so an
operation that fails part way leaves no image behind:

* layout: staged blobs are renamed in and `index.json` swapped at commit;
* registry: blobs are uploaded as they come (a blob without a manifest is not
  an image, and the registry checks each digest); the manifest is PUT last;
* docker-daemon: one `docker load` at commit, which Docker applies whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeGuard

from trustplane.errors import IntegrityError, UnsupportedError
from trustplane.oci import daemon, docker_archive, mediatypes
from trustplane.oci.credentials import Credentials, auth_files, lookup_credentials
from trustplane.oci.layout import Layout, LayoutWriter
from trustplane.oci.model import MAX_MANIFEST_SIZE, Descriptor, parse_manifest, verify_digest
from trustplane.oci.reference import DaemonRef, ImageRef, LayoutRef, RegistryRef
from trustplane.streaming import INPUT, Readable, pump, read_upto

if TYPE_CHECKING:
    from trustplane.oci.registry import RegistryClient, RegistryOptions

Progress = Callable[[int], object] | None


@dataclass(frozen=True)
class Endpoint:
    """How to reach one side of a copy (skopeo's --src-*/--dest-* options)."""

    tls_verify: bool = True
    ca_file: Path | None = None
    credentials: Credentials | None = None
    authfile: Path | None = None
    chunk_size: int | None = None

    def registry_options(self, host: str) -> RegistryOptions:
        # Imported here: httpx is a tenth of the start-up time, and only
        # docker:// references need it.
        from trustplane.oci.registry import RegistryOptions

        credentials = self.credentials or lookup_credentials(host, auth_files(self.authfile))
        return RegistryOptions(
            tls_verify=self.tls_verify,
            ca_file=self.ca_file,
            credentials=credentials,
            chunk_size=self.chunk_size,
        )

    def client(self, host: str) -> RegistryClient:
        from trustplane.oci.registry import RegistryClient

        return RegistryClient(host, self.registry_options(host))


class ImageSource(ABC):
    def __init__(self, ref: ImageRef) -> None:
        self.ref = ref

    @abstractmethod
    def top_manifest(self) -> tuple[bytes, str]:
        """The manifest or index the reference names, and its media type."""

    @abstractmethod
    def manifest_by_digest(self, digest: str) -> bytes:
        """A manifest that an index names (verified)."""

    @abstractmethod
    def open_blob(self, desc: Descriptor) -> AbstractContextManager[Readable]:
        """A stream of the blob, unverified: callers check as they read."""

    def read_blob(self, desc: Descriptor, limit: int) -> bytes:
        """A small blob (a config), verified against its digest."""
        if desc.size > limit:
            raise IntegrityError(f"{self.ref}: blob {desc.digest} claims {desc.size} bytes")
        with self.open_blob(desc) as stream:
            data = read_upto(stream, limit + 1)
        verify_digest(data, desc.digest, f"{self.ref}: blob")
        return data

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        pass


class ImageDestination(ABC):
    accepts_encrypted = True

    def __init__(self, ref: ImageRef) -> None:
        self.ref = ref

    @property
    @abstractmethod
    def staging(self) -> Path:
        """A private directory for blobs being made (mode 0700)."""

    @abstractmethod
    def has_blob(self, desc: Descriptor) -> bool: ...

    @abstractmethod
    def put_file(self, desc: Descriptor, path: Path, progress: Progress = None) -> None:
        """Take a complete local file, already verified to be `desc`."""

    @abstractmethod
    def copy_from(self, source: ImageSource, desc: Descriptor, progress: Progress = None) -> None:
        """Copy a blob unchanged from `source`, verifying its digest."""

    @abstractmethod
    def commit(self, manifest: bytes, media_type: str) -> str:
        """Make the image exist; returns the manifest digest."""

    @abstractmethod
    def close(self, committed: bool) -> None:
        """Clean up; without a commit, remove everything this side created."""

    def put_bytes(self, desc: Descriptor, data: bytes) -> None:
        verify_digest(data, desc.digest, f"{self.ref}: blob")
        path = self.staging / desc.digest.replace(":", "-")
        path.write_bytes(data)
        self.put_file(desc, path)

    def _spool(self, source: ImageSource, desc: Descriptor, progress: Progress) -> Path:
        """Stream a blob into staging, checking size and digest."""
        path = self.staging / (desc.digest.replace(":", "-") + ".part")
        sha = hashlib.new(desc.digest.partition(":")[0])
        with source.open_blob(desc) as stream, path.open("wb") as out:
            size = pump(
                stream,
                [(INPUT, out.write), (INPUT, sha.update)],
                limit=desc.size + 1,
                progress=progress,
            )
        if size != desc.size or f"{sha.name}:{sha.hexdigest()}" != desc.digest:
            path.unlink()
            raise IntegrityError(f"{source.ref}: blob {desc.digest} does not match its digest")
        return path


# -- OCI layout ---------------------------------------------------------------


class LayoutSource(ImageSource):
    def __init__(self, ref: LayoutRef) -> None:
        super().__init__(ref)
        self.layout = Layout(ref.path)
        self.tag = ref.tag

    def top_manifest(self) -> tuple[bytes, str]:
        entry = self.layout.find(self.tag)
        # Read up to the format's limit, not the index's size: a manifest
        # altered behind the index is then reported as a digest mismatch.
        data = self.layout.read_blob(entry.digest, MAX_MANIFEST_SIZE)
        verify_digest(data, entry.digest, f"{self.ref}: manifest")
        return data, entry.media_type

    def manifest_by_digest(self, digest: str) -> bytes:
        data = self.layout.read_blob(digest, MAX_MANIFEST_SIZE)
        verify_digest(data, digest, f"{self.ref}: manifest")
        return data

    def open_blob(self, desc: Descriptor) -> AbstractContextManager[Readable]:
        return self.layout.open_blob(desc.digest)


class LayoutDestination(ImageDestination):
    def __init__(self, ref: LayoutRef) -> None:
        super().__init__(ref)
        self.tag = ref.tag
        self.writer = LayoutWriter(ref.path)

    @property
    def staging(self) -> Path:
        return self.writer.staging

    def has_blob(self, desc: Descriptor) -> bool:
        return self.writer.has_blob(desc.digest)

    def put_file(self, desc: Descriptor, path: Path, progress: Progress = None) -> None:
        self.writer.stage(desc.digest, path)

    def copy_from(self, source: ImageSource, desc: Descriptor, progress: Progress = None) -> None:
        if not self.has_blob(desc):
            self.writer.stage(desc.digest, self._spool(source, desc, progress))

    def commit(self, manifest: bytes, media_type: str) -> str:
        return self.writer.commit(manifest, media_type, self.tag)

    def close(self, committed: bool) -> None:
        self.writer.close(committed)


# -- registry -----------------------------------------------------------------


class RegistrySource(ImageSource):
    def __init__(self, ref: RegistryRef, endpoint: Endpoint) -> None:
        super().__init__(ref)
        self.registry_ref = ref
        self.client = endpoint.client(ref.host)

    def top_manifest(self) -> tuple[bytes, str]:
        return self.client.get_manifest(self.registry_ref.repository, self.registry_ref.reference)

    def manifest_by_digest(self, digest: str) -> bytes:
        return self.client.get_manifest(self.registry_ref.repository, digest)[0]

    def open_blob(self, desc: Descriptor) -> AbstractContextManager[Readable]:
        return self.client.open_blob(self.registry_ref.repository, desc.digest)

    def close(self) -> None:
        self.client.close()


class RegistryDestination(ImageDestination):
    def __init__(self, ref: RegistryRef, endpoint: Endpoint) -> None:
        super().__init__(ref)
        self.registry_ref = ref
        self.client = endpoint.client(ref.host)
        self._staging = Path(tempfile.mkdtemp(prefix="trustplane-push-"))

    @property
    def staging(self) -> Path:
        return self._staging

    def has_blob(self, desc: Descriptor) -> bool:
        return self.client.has_blob(self.registry_ref.repository, desc.digest)

    def put_file(self, desc: Descriptor, path: Path, progress: Progress = None) -> None:
        if not self.has_blob(desc):
            self.client.upload_blob(
                self.registry_ref.repository,
                desc.digest,
                desc.size,
                lambda: path.open("rb"),
                progress,
            )

    def copy_from(self, source: ImageSource, desc: Descriptor, progress: Progress = None) -> None:
        repository = self.registry_ref.repository
        if self.has_blob(desc):
            return
        if self._mountable(source) and self.client.mount_blob(
            repository, desc.digest, source.registry_ref.repository
        ):
            return
        # The registry verifies the digest when the upload completes.
        self.client.upload_blob(
            repository, desc.digest, desc.size, lambda: source.open_blob(desc), progress
        )

    def _mountable(self, source: ImageSource) -> TypeGuard[RegistrySource]:
        """Blobs of the same registry are linked, not copied."""
        return (
            isinstance(source, RegistrySource)
            and source.registry_ref.host == self.registry_ref.host
        )

    def commit(self, manifest: bytes, media_type: str) -> str:
        return self.client.put_manifest(
            self.registry_ref.repository, self.registry_ref.reference, manifest, media_type
        )

    def close(self, committed: bool) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)
        self.client.close()


# -- Docker engine --------------------------------------------------------------


class DaemonSource(LayoutSource):
    """`docker save`, turned into a private OCI layout as it streams in."""

    def __init__(self, ref: DaemonRef) -> None:
        self._work = Path(tempfile.mkdtemp(prefix="trustplane-daemon-"))
        try:
            with daemon.save(ref.name) as stream:
                docker_archive.archive_to_layout(stream, self._work / "layout")
            super().__init__(LayoutRef(self._work / "layout", None))
        except BaseException:
            shutil.rmtree(self._work, ignore_errors=True)
            raise
        self.ref = ref

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)


class DaemonDestination(ImageDestination):
    """Collects the image, then gives it to `docker load` in one stream."""

    accepts_encrypted = False

    def __init__(self, ref: DaemonRef) -> None:
        super().__init__(ref)
        self.name = ref.name
        self._staging = Path(tempfile.mkdtemp(prefix="trustplane-load-"))
        self._files: dict[str, Path] = {}
        self.progress: Progress = None

    @property
    def staging(self) -> Path:
        return self._staging

    def has_blob(self, desc: Descriptor) -> bool:
        return desc.digest in self._files

    def put_file(self, desc: Descriptor, path: Path, progress: Progress = None) -> None:
        self._files[desc.digest] = path

    def copy_from(self, source: ImageSource, desc: Descriptor, progress: Progress = None) -> None:
        if not self.has_blob(desc):
            self._files[desc.digest] = self._spool(source, desc, progress)

    def commit(self, manifest: bytes, media_type: str) -> str:
        parsed = parse_manifest(manifest, f"{self.ref}: manifest")
        if any(mediatypes.is_encrypted(layer.media_type) for layer in parsed.layers):
            raise UnsupportedError(
                "Docker cannot store encrypted layers; write to oci: or docker://"
            )
        config = self._files[parsed.config.digest].read_bytes()
        layers = [
            docker_archive.ArchiveLayer(
                layer.digest, layer.size, _opener(self._files[layer.digest])
            )
            for layer in parsed.layers
        ]
        tags = [] if self.name.startswith("sha256:") else [self.name]
        daemon.load(docker_archive.load_stream(config, layers, tags, self.progress))
        return "sha256:" + hashlib.sha256(manifest).hexdigest()

    def close(self, committed: bool) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)


def _opener(path: Path) -> Callable[[], AbstractContextManager[IO[bytes]]]:
    @contextlib.contextmanager
    def open_file() -> Iterator[IO[bytes]]:
        with path.open("rb") as handle:
            yield handle

    return open_file


# -- factories ------------------------------------------------------------------


def open_source(ref: ImageRef, endpoint: Endpoint | None = None) -> ImageSource:
    endpoint = endpoint or Endpoint()
    if isinstance(ref, RegistryRef):
        return RegistrySource(ref, endpoint)
    if isinstance(ref, LayoutRef):
        return LayoutSource(ref)
    return DaemonSource(ref)


def open_destination(ref: ImageRef, endpoint: Endpoint | None = None) -> ImageDestination:
    endpoint = endpoint or Endpoint()
    if isinstance(ref, RegistryRef):
        return RegistryDestination(ref, endpoint)
    if isinstance(ref, LayoutRef):
        return LayoutDestination(ref)
    return DaemonDestination(ref)
