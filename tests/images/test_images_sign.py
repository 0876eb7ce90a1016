"""The simple-signing payload and the .sig tag, byte for byte as cosign 2.5 writes them."""

from __future__ import annotations

import json

import pytest

from trustplane.errors import IntegrityError, UnsupportedError
from trustplane.images.sign import (
    Signed,
    check_log_entry,
    docker_reference,
    sign_image,
    signature_tag,
    simple_signing_payload,
)
from trustplane.oci.reference import parse, parse_registry

DIGEST = "sha256:96ff873b34031e47c016746b3a01d9067cee60bfa1737339ec5c8a8d2442fee2"
# What `cosign sign` pushed for 127.0.0.1:33101/app, without and with `-a`.
COSIGN_PLAIN = (
    b'{"critical":{"identity":{"docker-reference":"127.0.0.1:33101/app"},'
    b'"image":{"docker-manifest-digest":"' + DIGEST.encode() + b'"},'
    b'"type":"cosign container image signature"},"optional":null}'
)
COSIGN_ANNOTATED = COSIGN_PLAIN.replace(b'"optional":null', b'"optional":{"a":"b","foo":"bar"}')


def test_payload_bytes_match_cosign() -> None:
    assert simple_signing_payload("127.0.0.1:33101/app", DIGEST) == COSIGN_PLAIN
    assert (
        simple_signing_payload("127.0.0.1:33101/app", DIGEST, {"foo": "bar", "a": "b"})
        == COSIGN_ANNOTATED
    )


def test_signature_tag_and_docker_reference() -> None:
    assert signature_tag(DIGEST) == "sha256-" + DIGEST[7:] + ".sig"
    assert (
        docker_reference(parse_registry("127.0.0.1:5000/shop/app:1")) == "127.0.0.1:5000/shop/app"
    )
    # go-containerregistry names Docker Hub index.docker.io
    assert docker_reference(parse_registry("busybox")) == "index.docker.io/library/busybox"


def test_only_registry_images_are_signed() -> None:
    with pytest.raises(UnsupportedError, match="registry"):
        sign_image(parse("oci:/tmp/layout:1"), None)  # type: ignore[arg-type]


def test_a_log_entry_must_record_this_signature() -> None:
    signed = Signed(
        manifest_digest=DIGEST,
        docker_reference="127.0.0.1:33101/app",
        payload=COSIGN_PLAIN,
        signature=b"sig",
        key_id="sha256:" + "1" * 64,
        log_index=7,
    )
    entry = {
        "kind": "signature",
        "manifest": DIGEST,
        "key_id": signed.key_id,
        "signature": signed.signature_digest,
        "payload": signed.payload_digest,
    }
    check_log_entry(json.dumps(entry).encode(), signed)
    for name in entry:
        with pytest.raises(IntegrityError, match="does not record this signature"):
            check_log_entry(json.dumps({**entry, name: "other"}).encode(), signed)
    with pytest.raises(IntegrityError):
        check_log_entry(b"not json", signed)
