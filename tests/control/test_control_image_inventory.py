"""The image inventory's rules: who may register, registration conflicts, file digests, places."""

from __future__ import annotations

import os

import pytest
from plane_helpers import entries_since

from trustplane.api.images import ImageRecord, PublishedLayer
from trustplane.control.identity import Principal
from trustplane.control.release import Uncached
from trustplane.control.service import ControlPlane
from trustplane.errors import Forbidden, IntegrityError, NotFoundError, UsageError

ADMIN = Principal("user", "admin", "admin", frozenset())
MALLORY = Principal("user", "mallory", "operator", frozenset())
USER = Principal("user", "ursula", "user", frozenset())
FILES = {"/bin/sh": "symlink:/bin/busybox", "/bin/busybox": "sha256:" + "c" * 64}


def digest() -> str:
    return "sha256:" + os.urandom(32).hex()


def image(repository: str, *layers: PublishedLayer, manifest: str | None = None) -> ImageRecord:
    return ImageRecord(
        repository=repository, manifest_digest=manifest or digest(), layers=list(layers)
    )


def layer(
    index: int, plain: str, encrypted: bool = False, files: dict[str, str] | None = None
) -> PublishedLayer:
    return PublishedLayer(index=index, digest=plain, encrypted=encrypted, files=files)


def test_a_registration_is_logged_and_listed(plane: ControlPlane) -> None:
    start, _ = plane.log.head()
    record = image("shop/app", layer(0, digest()), layer(1, digest(), encrypted=True))
    index = plane.images.register(ADMIN, record)
    (listed,) = plane.images.images(USER, "shop/app")
    assert (listed.manifest_digest, listed.publisher) == (record.manifest_digest, "user:admin")
    assert [x.digest for x in listed.layers] == [x.digest for x in record.layers]
    (entry,) = entries_since(plane, start)
    assert entry["kind"] == "image.register"
    assert index == start
    assert entry["layers"] == [x.digest for x in record.layers]


def test_only_publishers_register(plane: ControlPlane) -> None:
    with pytest.raises(Forbidden, match=r"policy refuses image\.publish of shop/app"):
        plane.images.register(USER, image("shop/app", layer(0, digest())))
    assert plane.images.images(ADMIN, "shop/app") == []


def test_an_encrypted_layer_another_publisher_registered_is_refused(plane: ControlPlane) -> None:
    """Unwrap follows the first registration of a layer: nobody else's policy may take it."""
    secret, base = digest(), digest()
    plane.images.register(MALLORY, image("mallory/app", layer(0, base), layer(1, secret)))
    # Her own mirror of the same layers, encrypted: the same publisher, allowed.
    plane.images.register(MALLORY, image("mirror/app", layer(0, base), layer(1, secret, True)))
    with pytest.raises(IntegrityError, match=r"already registered under .* by another publisher"):
        plane.images.register(ADMIN, image("victim/app", layer(0, base), layer(1, secret, True)))
    assert plane.images.images(ADMIN, "victim/app") == []  # nothing stored
    # A shared plain layer claims nothing.
    plane.images.register(ADMIN, image("victim/app", layer(0, base), layer(1, secret, False)))
    assert len(plane.images.images(ADMIN, "victim/app")) == 1


def test_file_digests_come_once_and_are_never_replaced(plane: ControlPlane) -> None:
    manifest, plain = digest(), digest()
    plane.images.register(ADMIN, image("shop/app", layer(0, plain), manifest=manifest))
    (files,) = plane.images.files(ADMIN, "shop/app", manifest).layers
    assert files.files is None  # none yet: registered before its files
    with_files = image("shop/app", layer(0, plain, files=FILES), manifest=manifest)
    plane.images.register(ADMIN, with_files)
    plane.images.register(ADMIN, with_files)  # the same again: nothing changes
    changed = image(
        "shop/app", layer(0, plain, files={**FILES, "/bin/sh": "whiteout"}), manifest=manifest
    )
    with pytest.raises(IntegrityError, match="not replaced"):
        plane.images.register(ADMIN, changed)
    other = image("shop/app", layer(0, digest(), files=FILES), manifest=manifest)
    with pytest.raises(IntegrityError, match="registered with other layers"):
        plane.images.register(ADMIN, other)
    (files,) = plane.images.files(ADMIN, "shop/app", manifest).layers
    assert files.files == FILES
    with pytest.raises(NotFoundError, match="is not registered"):
        plane.images.files(ADMIN, "shop/app", digest())


def test_a_layer_is_placed_by_its_earliest_registration(plane: ControlPlane) -> None:
    plain = digest()
    with pytest.raises(Uncached):
        plane.images.layer_place(plain, database=False)  # unknown: only the database knows
    assert plane.images.layer_place(plain) is None
    plane.images.register(ADMIN, image("shop/app", layer(0, digest()), layer(1, plain)))
    plane.images.register(ADMIN, image("shop/copy", layer(3, plain)))
    assert plane.images.layer_place(plain) == ("shop/app", 1)
    assert plane.images.layer_place(plain, database=False) == ("shop/app", 1)  # remembered


def test_every_spelling_of_a_name_is_one_repository(plane: ControlPlane) -> None:
    """Stored, looked up and authorized under the canonical name (oci/reference.py)."""
    manifest, plain = digest(), digest()
    record = image("registry-1.docker.io/library/app", layer(0, plain), manifest=manifest)
    plane.images.register(ADMIN, record)
    for spelling in ("app", "library/app", "docker.io/app", "index.docker.io/library/app"):
        (listed,) = plane.images.images(USER, spelling)
        assert listed.repository == "app"
        assert plane.images.files(USER, spelling, manifest).repository == "app"
    assert plane.images.layer_place(plain) == ("app", 0)
    # localhost/app names a local registry's image, not the Hub's.
    assert plane.images.images(USER, "localhost/app") == []
    with pytest.raises(UsageError, match="without :TAG"):
        plane.images.images(USER, "app:v1")
