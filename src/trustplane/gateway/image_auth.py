"""Image authentication: is this image what the control plane registered?

An image is authentic when the control plane holds a record for its
repository whose content matches what dockerd has:

- its manifest digest is one of the image's `RepoDigests` (pulled by digest
  or from a registry), or
- its layers' `diff_id`s, in order, are exactly the image's `RootFS.Layers`
  (an image loaded or built locally has no manifest digest; its root file
  system is still pinned layer by layer).

A pull names a repository that must be registered; a pull by digest must
name a registered manifest digest. (A pull by tag cannot be pinned before
it happens: the content is checked when a container is started from it.)

Where the gateway checks signatures (image_signatures.py), the digest a
pull names, or the record a start matched, must also pass them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trustplane.api.images import ImageEntry
from trustplane.errors import Forbidden, NotFoundError, UsageError
from trustplane.gateway.control_link import ControlLink
from trustplane.gateway.docker_api import DockerApi
from trustplane.oci.reference import normalize

if TYPE_CHECKING:
    from trustplane.gateway.image_signatures import SignatureCheck


def reference_name(reference: str) -> tuple[str, str | None]:
    """(canonical repository name, digest or None) of `name[:tag][@digest]`.

    oci/reference.py's normaliser, the one the control plane applies to what
    is registered: a name that is not valid is refused (Forbidden), never
    guessed at.
    """
    try:
        named = normalize(reference)
    except UsageError as exc:
        raise Forbidden(f"trustplane gateway: {exc}") from None
    return named.name, named.digest


def looks_like_id(reference: str) -> bool:
    """An image id or id prefix (hex), as opposed to a name."""
    text = reference.removeprefix("sha256:")
    return all(c in "0123456789abcdef" for c in text) and 12 <= len(text) <= 64


class ImageAuthenticator:
    def __init__(
        self, link: ControlLink, docker: DockerApi, signatures: SignatureCheck | None = None
    ) -> None:
        self.link = link
        self.docker = docker
        self.signatures = signatures

    async def _signed(self, record: ImageEntry, image_name: str) -> None:
        """Forbidden unless the record's digest passes the signature check (if any)."""
        if self.signatures is not None:
            await self.signatures.check(record.repository, record.manifest_digest, image_name)

    async def _records(self, repository: str) -> list[ImageEntry]:
        """What the control plane registered under the canonical name `repository`."""
        return await self.link.images(repository)

    async def for_pull(self, reference: str) -> str:
        """The repository to authorize `image.pull` on; Forbidden when not registered."""
        repository, digest = reference_name(reference)
        records = await self._records(repository)
        if not records:
            raise Forbidden(f"image {repository} is not registered with the control plane")
        if digest is not None:
            pinned = [r for r in records if r.manifest_digest == digest]
            if not pinned:
                raise Forbidden(f"image {repository}@{digest} is not a registered digest")
            await self._first_signed(pinned, repository)
        return repository

    async def _first_signed(self, records: list[ImageEntry], image_name: str) -> None:
        """At least one of the matching records passes the signature check."""
        refusal: Forbidden | None = None
        for record in records:
            try:
                await self._signed(record, image_name)
            except Forbidden as exc:
                refusal = refusal or exc
            else:
                return
        if refusal is not None:
            raise refusal

    async def for_start(self, reference: str) -> tuple[str, str]:
        """(repository, image id) of the local image `reference`, once it matches a record."""
        image = await self.docker.inspect("images", reference)
        if image is None:
            raise NotFoundError(f"No such image: {reference}")
        candidates: list[str] = []
        if not looks_like_id(reference):
            candidates.append(reference_name(reference)[0])
        for tagged in [*_strings(image.get("RepoTags")), *_strings(image.get("RepoDigests"))]:
            try:
                repository = normalize(tagged).name
            except UsageError:
                continue  # "<none>:<none>", or a name dockerd keeps that we cannot read
            if repository not in candidates:
                candidates.append(repository)
        digests = {d.partition("@")[2] for d in _strings(image.get("RepoDigests"))}
        rootfs = image.get("RootFS")
        layers = _strings(rootfs.get("Layers")) if isinstance(rootfs, dict) else []
        for repository in candidates:
            matching = [
                record
                for record in await self._records(repository)
                if record.manifest_digest in digests or _same_layers(record, layers)
            ]
            if matching:
                await self._first_signed(matching, repository)
                return repository, str(image.get("Id", ""))
        shown = candidates[0] if candidates else reference
        raise Forbidden(
            f"image {shown} ({str(image.get('Id', ''))[:19]}) is not registered with the "
            "control plane: its digest and layers match no published record"
        )


def _same_layers(record: ImageEntry, layers: list[str]) -> bool:
    if not record.layers or not layers:
        return False
    ordered = sorted(record.layers, key=lambda item: item.index)
    return [item.diff_id for item in ordered] == layers


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str)]
