"""The image inventory: which plain layer digests a published image holds, at which index.

A publisher registers an image (`image.publish` on `image:REPO`) with its
layers' plain digests and, for runtime integrity, the file digests of each
layer (reference_files.py). Registrations are never changed or removed:
edge gateways and node agents read them to authenticate an image, and the
layer-key broker (key_broker.py) learns from them which image, and so whose
policy, a layer's key belongs to.

Repositories are stored, looked up and authorized under their canonical name
(oci/reference.py), so every spelling of an image finds the same records.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from trustplane.api.images import ImageEntry, ImageFiles, ImageRecord, LayerFilesEntry, LayerRecord
from trustplane.control import reference_files
from trustplane.control.db import Database
from trustplane.control.identity import Principal
from trustplane.control.models import Image, LayerDigest
from trustplane.control.policy import Decision
from trustplane.control.release import Uncached
from trustplane.control.transparency import TransparencyLog
from trustplane.errors import Forbidden, IntegrityError, NotFoundError
from trustplane.oci.reference import repository_name

MAX_CACHED_PLACES = 4096
Authorize = Callable[[Principal, str, str, int | None], Decision]


class ImageInventory:
    def __init__(self, db: Database, log: TransparencyLog, authorize: Authorize) -> None:
        self.db = db
        self.log = log
        self.authorize = authorize
        self._places: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def register(self, principal: Principal, image: ImageRecord) -> int:
        """Record an image; its log entry's index. File digests may come with it,
        also for an image registered before, in the same transaction."""
        repository, manifest_digest = repository_name(image.repository), image.manifest_digest
        self._require(principal, "image.publish", repository)
        layers = [layer.model_dump(exclude={"files"}) for layer in image.layers]
        files = {layer.index: layer.files for layer in image.layers if layer.files is not None}
        with self.db.write_session() as session:
            existing = session.scalar(
                select(Image).where(
                    Image.repository == repository, Image.manifest_digest == manifest_digest
                )
            )
            if existing is not None and files:
                stored = {int(str(x["index"])): x.get("digest") for x in existing.layers}
                given = {layer.index: layer.digest for layer in image.layers}
                if any(stored.get(index) != given.get(index) for index in files):
                    raise IntegrityError(
                        f"{repository}@{manifest_digest} is registered with other layers"
                    )
                reference_files.attach(session, existing, files)
            if existing is None:
                check_layer_claims(session, principal, repository, image.layers)
                row = Image(
                    repository=repository,
                    manifest_digest=manifest_digest,
                    layers=layers,
                    publisher=principal.subject,
                )
                session.add(row)
                session.flush()
                reference_files.attach(session, row, files)
                for layer in image.layers:
                    session.add(
                        LayerDigest(
                            digest=layer.digest, repository=repository, layer_index=layer.index
                        )
                    )
        entry: dict[str, object] = {
            "subject": principal.subject,
            "image": repository,
            "manifest": manifest_digest,
            "layers": [layer.digest for layer in image.layers],
        }
        if files:
            entry["files"] = {
                str(index): reference_files.map_digest(layer_files)
                for index, layer_files in sorted(files.items())
            }
        return self.log.append("image.register", entry).index

    def images(self, principal: Principal, repository: str) -> list[ImageEntry]:
        """What is registered for `repository` (needs image.pull on it)."""
        repository = repository_name(repository)
        self._require(principal, "image.pull", repository)
        with self.db.session() as session:
            rows = session.scalars(
                select(Image).where(Image.repository == repository).order_by(Image.id)
            ).all()
            return [
                ImageEntry(
                    repository=row.repository,
                    manifest_digest=row.manifest_digest,
                    layers=[LayerRecord.model_validate(layer) for layer in row.layers],
                    publisher=row.publisher,
                )
                for row in rows
            ]

    def files(self, principal: Principal, repository: str, manifest_digest: str) -> ImageFiles:
        """The file digests registered for one image (needs image.pull on it)."""
        repository = repository_name(repository)
        self._require(principal, "image.pull", repository)
        with self.db.session() as session:
            row = session.scalar(
                select(Image).where(
                    Image.repository == repository, Image.manifest_digest == manifest_digest
                )
            )
            if row is None:
                raise NotFoundError(f"{repository}@{manifest_digest} is not registered")
            files = reference_files.read(session, row)
            return ImageFiles(
                repository=row.repository,
                manifest_digest=row.manifest_digest,
                layers=[
                    LayerFilesEntry(
                        index=int(str(layer["index"])),
                        digest=str(layer["digest"]),
                        diff_id=None if layer.get("diff_id") is None else str(layer["diff_id"]),
                        files=files.get(int(str(layer["index"]))),
                    )
                    for layer in row.layers
                ],
            )

    def layer_place(self, digest: str, database: bool = True) -> tuple[str, int] | None:
        """Which image and index a plain layer digest was registered at.

        Registrations are never changed or removed, so a found place is kept
        in memory (bounded); an unknown digest is asked again every time, as a
        registration may have come in since (on this replica or another). The
        earliest registration of a digest counts, on every replica alike.
        `database=False` raises Uncached where a database read would be needed.
        """
        with self._lock:
            cached = self._places.get(digest)
        if cached is not None:
            return cached
        if not database:
            raise Uncached
        with self.db.session() as session:
            row = session.execute(
                select(LayerDigest.repository, LayerDigest.layer_index)
                .where(LayerDigest.digest == digest)
                .order_by(LayerDigest.id)
                .limit(1)
            ).first()
        if row is None:
            return None
        place = (str(row[0]), int(row[1]))
        with self._lock:
            if len(self._places) >= MAX_CACHED_PLACES:
                self._places.clear()
            self._places[digest] = place
        return place

    def _require(self, principal: Principal, action: str, repository: str) -> None:
        decision = self.authorize(principal, action, f"image:{repository}", None)
        if not decision.allowed:
            raise Forbidden(f"policy refuses {action} of {repository}: {decision.reason}")


def check_layer_claims(
    session: Session, principal: Principal, repository: str, layers: Sequence[LayerRecord]
) -> None:
    """Refuse an encrypted layer another publisher registered under another image.

    Unwrap learns a layer's image (and so whose policy releases its key) from
    the earliest registration of its plain digest; a publisher who registered
    someone else's layer digest first, under an image of its own, would decide
    who receives that layer's key. Refused loudly rather than silently shadowed.
    """
    encrypted = sorted({layer.digest for layer in layers if layer.encrypted})
    if not encrypted:
        return
    claimed = session.execute(
        select(LayerDigest.digest, LayerDigest.repository)
        .join(Image, Image.repository == LayerDigest.repository)
        .where(
            LayerDigest.digest.in_(encrypted),
            LayerDigest.repository != repository,
            Image.publisher != principal.subject,
        )
        .limit(1)
    ).first()
    if claimed is not None:
        raise IntegrityError(
            f"encrypted layer {claimed.digest} is already registered under {claimed.repository} "
            "by another publisher; its key would follow that image's policy"
        )
