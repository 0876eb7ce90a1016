"""`image sign` and `image verify` in cosign's format.

What cosign 2.5 writes, measured against the binary (`cosign sign --key`):

* the payload is the simple-signing JSON, Go-encoded (struct order, which
  is also sorted order; no spaces)::

      {"critical":{"identity":{"docker-reference":"HOST/REPO"},
       "image":{"docker-manifest-digest":"sha256:…"},
       "type":"cosign container image signature"},"optional":null}

  (`optional` holds the `-a key=value` annotations, keys sorted, or null);
* the signature is over those exact bytes (see crypto/signing.py);
* the tag `sha256-<hex>.sig` in the image's repository holds an OCI
  manifest whose layers are the payloads (media type
  `application/vnd.dev.cosign.simplesigning.v1+json`) with the std-base64
  signature in the annotation `dev.cosignproject.cosign/signature`, and
  whose config is a go-containerregistry empty-image config listing the
  payloads as diff_ids. A new signature is appended to the layers already
  there; signing again with the same payload and signature changes nothing.

Verification fetches the image's manifest by the reference given and
accepts it only when some signature layer (1) is signed by the given key,
(2) names that manifest's digest and (3) names the reference's repository
as its docker-reference. Every failure is an IntegrityError (exit code 5)
that says which of the three failed; a registry that refuses us is an
AuthError (4), one that cannot be reached UnavailableError (8).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trustplane.crypto.signing import SigningKey, VerifyKey
from trustplane.errors import IntegrityError, MalformedError, NotFoundError, UnsupportedError
from trustplane.oci import gojson, mediatypes
from trustplane.oci.annotations import COSIGN_SIGNATURE, SIGNATURE_LOG_INDEX
from trustplane.oci.model import MAX_MANIFEST_SIZE, sha256_digest
from trustplane.oci.reference import DEFAULT_REGISTRY, ImageRef, RegistryRef, same_repository
from trustplane.oci.registry import RegistryClient
from trustplane.oci.transport import Endpoint

SIGNATURE_TYPE = "cosign container image signature"
MAX_PAYLOAD_SIZE = 1 << 20
MAX_SIGNATURES = 256


@dataclass(frozen=True)
class Signed:
    """One signature, as made or as found and verified."""

    manifest_digest: str
    docker_reference: str
    payload: bytes
    signature: bytes
    key_id: str
    optional: dict[str, Any] | None = None
    log_index: int | None = None

    @property
    def payload_digest(self) -> str:
        return sha256_digest(self.payload)

    @property
    def signature_digest(self) -> str:
        return sha256_digest(self.signature)


@dataclass(frozen=True)
class SignResult:
    signed: Signed
    signature_tag: str
    signatures: int
    """How many signatures the .sig manifest holds now."""
    appended: bool
    """False when that very signature was there already."""


@dataclass(frozen=True)
class VerifyResult:
    manifest_digest: str
    verified: list[Signed] = field(default_factory=list)


Recorder = Callable[[Signed], int | None]
"""Given a new signature before it is pushed, returns its log index (or None)."""


def simple_signing_payload(
    docker_reference: str, manifest_digest: str, optional: dict[str, Any] | None = None
) -> bytes:
    """cosign's payload bytes for an image (Go's encoding, maps sorted)."""
    return gojson.dumps(
        {
            "critical": {
                "identity": {"docker-reference": docker_reference},
                "image": {"docker-manifest-digest": manifest_digest},
                "type": SIGNATURE_TYPE,
            },
            "optional": dict(sorted(optional.items())) if optional else None,
        }
    )


def signature_tag(manifest_digest: str) -> str:
    """`sha256-<hex>.sig`: where cosign keeps an image's signatures."""
    algorithm, _, hexdigest = manifest_digest.partition(":")
    return f"{algorithm}-{hexdigest}.sig"


def docker_reference(ref: RegistryRef) -> str:
    """HOST/REPOSITORY as go-containerregistry names it (index.docker.io for Docker Hub).

    Only what is written into a new payload; a signed docker-reference is
    compared by the one normaliser (`same_repository`), whatever its spelling.
    """
    host = "index.docker.io" if ref.host == DEFAULT_REGISTRY else ref.host
    return f"{host}/{ref.repository}"


def sign_image(
    ref: ImageRef,
    key: SigningKey,
    endpoint: Endpoint | None = None,
    optional: dict[str, Any] | None = None,
    record: Recorder | None = None,
) -> SignResult:
    """Sign the manifest `ref` names and append the signature to its .sig tag."""
    target = _registry_ref(ref)
    with (endpoint or Endpoint()).client(target.host) as client:
        manifest, _ = client.get_manifest(target.repository, target.reference)
        digest = sha256_digest(manifest)
        payload = simple_signing_payload(docker_reference(target), digest, optional)
        signed = Signed(
            manifest_digest=digest,
            docker_reference=docker_reference(target),
            payload=payload,
            signature=key.sign(payload),
            key_id=key.public.key_id,
            optional=optional or None,
        )
        tag = signature_tag(digest)
        existing = _signature_manifest(client, target.repository, tag)
        layers: list[dict[str, Any]] = list(existing["layers"]) if existing else []
        encoded = base64.b64encode(signed.signature).decode()
        for layer in layers:
            same_payload = layer.get("digest") == signed.payload_digest
            if same_payload and (layer.get("annotations") or {}).get(COSIGN_SIGNATURE) == encoded:
                return SignResult(signed, tag, len(layers), appended=False)
        if len(layers) >= MAX_SIGNATURES:
            raise UnsupportedError(f"{target}: already {len(layers)} signatures; not adding more")
        if record is not None:
            index = record(signed)
            if index is not None:
                signed = dataclasses.replace(signed, log_index=index)
        annotations = {COSIGN_SIGNATURE: encoded}
        if signed.log_index is not None:
            annotations[SIGNATURE_LOG_INDEX] = str(signed.log_index)
        client.put_small_blob(target.repository, payload)
        layers.append(
            {
                "mediaType": mediatypes.COSIGN_SIMPLE_SIGNING,
                "size": len(payload),
                "digest": signed.payload_digest,
                "annotations": annotations,
            }
        )
        config = _empty_image_config([str(layer["digest"]) for layer in layers])
        config_digest = client.put_small_blob(target.repository, config)
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "config": {
                "mediaType": mediatypes.OCI_CONFIG,
                "size": len(config),
                "digest": config_digest,
            },
            "layers": layers,
        }
        if existing and existing.get("annotations"):
            document["annotations"] = existing["annotations"]
        client.put_manifest(target.repository, tag, gojson.dumps(document), mediatypes.OCI_MANIFEST)
    return SignResult(signed, tag, len(layers), appended=True)


def verify_image(ref: ImageRef, key: VerifyKey, endpoint: Endpoint | None = None) -> VerifyResult:
    """The signatures by `key` on the manifest `ref` names; IntegrityError if none."""
    target = _registry_ref(ref)
    expected_reference = docker_reference(target)
    with (endpoint or Endpoint()).client(target.host) as client:
        manifest, _ = client.get_manifest(target.repository, target.reference)
        digest = sha256_digest(manifest)
        tag = signature_tag(digest)
        existing = _signature_manifest(client, target.repository, tag)
        if existing is None:
            raise IntegrityError(f"{target} ({digest}) is not signed: there is no {tag}")
        failures: list[str] = []
        verified: list[Signed] = []
        for position, layer in enumerate(existing["layers"]):
            what = f"signature {position} in {tag}"
            if layer.get("mediaType") != mediatypes.COSIGN_SIMPLE_SIGNING:
                continue
            try:
                verified.append(
                    _check_layer(client, target, layer, key, digest, expected_reference, what)
                )
            except (IntegrityError, MalformedError, NotFoundError) as exc:
                failures.append(str(exc))
    if not verified:
        reasons = "; ".join(failures) if failures else "it holds no simple-signing layer"
        raise IntegrityError(f"{target} ({digest}): no valid signature by {key.source}: {reasons}")
    return VerifyResult(digest, verified)


def check_log_entry(entry: bytes, signed: Signed) -> None:
    """The log entry at `signed.log_index` must record this very signature."""
    try:
        body = json.loads(entry)
    except ValueError:
        raise IntegrityError(f"log entry {signed.log_index} is not JSON") from None
    expected = {
        "kind": "signature",
        "manifest": signed.manifest_digest,
        "key_id": signed.key_id,
        "signature": signed.signature_digest,
        "payload": signed.payload_digest,
    }
    for name, value in expected.items():
        if not isinstance(body, dict) or body.get(name) != value:
            raise IntegrityError(
                f"log entry {signed.log_index} does not record this signature "
                f"({name} is {body.get(name) if isinstance(body, dict) else None!r}, "
                f"expected {value!r})"
            )


# -- helpers ---------------------------------------------------------------------


def _registry_ref(ref: ImageRef) -> RegistryRef:
    if not isinstance(ref, RegistryRef):
        raise UnsupportedError(
            f"{ref}: signatures live in a registry (cosign's .sig tag); give docker://HOST/REPO"
        )
    return ref


def _signature_manifest(client: RegistryClient, repository: str, tag: str) -> dict[str, Any] | None:
    try:
        data, _ = client.get_manifest(repository, tag)
    except NotFoundError:
        return None
    what = f"signature manifest {repository}:{tag}"
    if len(data) > MAX_MANIFEST_SIZE:
        raise MalformedError(f"{what} is larger than 4 MiB")
    try:
        document = json.loads(data)
    except ValueError:
        raise MalformedError(f"{what} is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
        raise MalformedError(f"{what} has no layers")
    if not all(isinstance(layer, dict) for layer in document["layers"]):
        raise MalformedError(f"{what}: layers are not objects")
    return document


def _check_layer(
    client: RegistryClient,
    target: RegistryRef,
    layer: dict[str, Any],
    key: VerifyKey,
    digest: str,
    expected_reference: str,
    what: str,
) -> Signed:
    annotations = layer.get("annotations") or {}
    encoded = annotations.get(COSIGN_SIGNATURE) if isinstance(annotations, dict) else None
    if not isinstance(encoded, str):
        raise MalformedError(f"{what} has no {COSIGN_SIGNATURE} annotation")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"{what}: the signature is not base64") from None
    layer_digest, size = layer.get("digest"), layer.get("size")
    if not isinstance(layer_digest, str) or not isinstance(size, int):
        raise MalformedError(f"{what} has no digest or size")
    if size > MAX_PAYLOAD_SIZE:
        raise MalformedError(f"{what}: payload of {size} bytes is too large")
    payload = client.read_small_blob(target.repository, layer_digest, MAX_PAYLOAD_SIZE)
    critical, optional = check_signed_payload(payload, signature, key, digest, what)
    signed_reference = critical["identity"]["docker-reference"]
    if not same_repository(signed_reference, expected_reference):
        raise IntegrityError(
            f"{what} names {signed_reference!r}, not {expected_reference!r} (docker-reference)"
        )
    index = annotations.get(SIGNATURE_LOG_INDEX)
    return Signed(
        manifest_digest=digest,
        docker_reference=signed_reference,
        payload=payload,
        signature=signature,
        key_id=key.key_id,
        optional=optional,
        log_index=int(index) if isinstance(index, str) and index.isdigit() else None,
    )


def check_signed_payload(
    payload: bytes, signature: bytes, key: VerifyKey, digest: str, what: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(critical, optional) of a payload `key` signed over manifest `digest`; else IntegrityError.

    The caller still checks the payload's docker-reference against what it expected.
    """
    try:
        key.verify(payload, signature)
    except IntegrityError:
        raise IntegrityError(f"{what} does not verify with {key.source}") from None
    critical, optional = _parse_payload(payload, what)
    signed_digest = critical["image"]["docker-manifest-digest"]
    if signed_digest != digest:
        raise IntegrityError(f"{what} is for another image ({signed_digest}), not {digest}")
    return critical, optional


def _parse_payload(payload: bytes, what: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    try:
        document = json.loads(payload)
        critical = document["critical"]
        if critical["type"] != SIGNATURE_TYPE:
            raise IntegrityError(
                f"{what}: payload type {critical['type']!r}, not {SIGNATURE_TYPE!r}"
            )
        if not isinstance(critical["image"]["docker-manifest-digest"], str):
            raise TypeError
        if not isinstance(critical["identity"]["docker-reference"], str):
            raise TypeError
        optional = document.get("optional")
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(
            f"{what}: the signed payload is not a simple-signing document"
        ) from None
    return critical, optional if isinstance(optional, dict) else None


def _empty_image_config(diff_ids: list[str]) -> bytes:
    """The config go-containerregistry gives an image appended to empty.Image,
    as cosign writes it (one history entry per layer)."""
    zero = "0001-01-01T00:00:00Z"
    return gojson.dumps(
        {
            "architecture": "",
            "created": zero,
            "history": [{"created": zero} for _ in diff_ids],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {},
        }
    )
