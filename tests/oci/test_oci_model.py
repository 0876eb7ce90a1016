"""OCI manifests, indexes and configs: Go's bytes out, one-line errors in."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from trustplane.errors import IntegrityError, MalformedError
from trustplane.oci import mediatypes
from trustplane.oci.model import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    media_type_of,
    parse_index,
    parse_manifest,
    sha256_digest,
    verify_digest,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64

# Byte for byte what Go's json.Marshal writes for image-spec's v1.Manifest
# (skopeo copy of an encrypted image): struct field order, maps sorted.
GO_MANIFEST = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
    b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"'
    + D1.encode()
    + b'","size":585},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip",'
    b'"digest":"' + D2.encode() + b'","size":0},{"mediaType":'
    b'"application/vnd.oci.image.layer.v1.tar+gzip+encrypted","digest":"'
    + D3.encode()
    + b'","size":1234,"annotations":{"org.opencontainers.image.enc.keys.jwe":"ZXlK",'
    b'"org.opencontainers.image.enc.pubopts":"eyJj"}}],'
    b'"annotations":{"a":"x\\u003cy","b":"2"}}'
)


def _manifest(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(GO_MANIFEST)
    doc.update(changes)
    return doc


def _raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_go_manifest_roundtrips_byte_for_byte() -> None:
    manifest = parse_manifest(GO_MANIFEST, "m")
    assert manifest.to_bytes() == GO_MANIFEST
    assert manifest.config.size == 585
    assert [layer.is_encrypted for layer in manifest.layers] == [False, True]
    assert manifest.layers[1].annotation("org.opencontainers.image.enc.pubopts") == "eyJj"
    assert manifest.layers[0].annotation("missing") is None


def test_python_formatted_manifest_comes_out_go_formatted() -> None:
    doc = _manifest(annotations={"b": "2", "a": "x<y"})  # unsorted, spaces, raw '<'
    data = json.dumps(doc, indent=2).encode()
    assert parse_manifest(data, "m").to_bytes() == GO_MANIFEST


def test_descriptor_field_order_is_go_struct_order() -> None:
    descriptor = Descriptor(
        artifact_type="application/x.artifact",
        platform=Platform(
            variant="v8",
            os_features=("f1",),
            os_version="10.0",
            os="linux",
            architecture="arm64",
        ),
        data="e30=",
        annotations={"z": "1", "k": "2"},
        urls=("https://example.com/blob",),
        size=2,
        digest=D1,
        media_type="application/vnd.oci.image.config.v1+json",
    )
    assert list(descriptor.go_dict()) == [
        "mediaType",
        "digest",
        "size",
        "urls",
        "annotations",
        "data",
        "platform",
        "artifactType",
    ]
    assert list(descriptor.go_dict()["platform"]) == [
        "architecture",
        "os",
        "os.version",
        "os.features",
        "variant",
    ]
    assert list(descriptor.go_dict()["annotations"]) == ["k", "z"]


def test_omitempty_drops_empty_optionals_but_keeps_layers_and_size_zero() -> None:
    manifest = Manifest(
        schema_version=2,
        config=Descriptor(media_type=mediatypes.OCI_CONFIG, digest=D1, size=0, annotations={}),
        layers=(),
        annotations={},
    )
    assert manifest.to_bytes() == (
        b'{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json",'
        b'"digest":"' + D1.encode() + b'","size":0},"layers":[]}'
    )


def test_manifest_field_order_with_subject_and_artifact_type() -> None:
    doc = _manifest(
        subject={"mediaType": mediatypes.OCI_MANIFEST, "digest": D3, "size": 7},
        artifactType="application/x.sig",
    )
    keys = list(json.loads(parse_manifest(_raw(doc), "m").to_bytes()))
    assert keys == [
        "schemaVersion",
        "mediaType",
        "artifactType",
        "config",
        "layers",
        "subject",
        "annotations",
    ]


def test_index_roundtrip_and_order() -> None:
    go_index = (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
        b'"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'
        + D1.encode()
        + b'","size":500,"annotations":{"org.opencontainers.image.ref.name":"latest"},'
        b'"platform":{"architecture":"amd64","os":"linux"}}]}'
    )
    index = parse_index(go_index, "i")
    assert index.to_bytes() == go_index
    assert index.manifests[0].platform == Platform(architecture="amd64", os="linux")
    assert Index(schema_version=2, manifests=()).to_bytes() == b'{"schemaVersion":2,"manifests":[]}'


def test_docker_v2s2_manifest_is_accepted() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": mediatypes.DOCKER_MANIFEST,
        "config": {"mediaType": mediatypes.DOCKER_CONFIG, "size": 7, "digest": D1},
        "layers": [{"mediaType": mediatypes.DOCKER_LAYER_GZIP, "size": 9, "digest": D2}],
    }
    manifest = parse_manifest(_raw(doc), "m")
    assert manifest.media_type == mediatypes.DOCKER_MANIFEST
    assert manifest.layers[0].size == 9


def test_unknown_fields_are_ignored() -> None:
    doc = _manifest(future={"x": 1})
    assert parse_manifest(_raw(doc), "m").to_bytes() == GO_MANIFEST


def _with_config(**changes: Any) -> dict[str, Any]:
    doc = _manifest()
    doc["config"] = {**doc["config"], **changes}
    return doc


def _without(key: str) -> dict[str, Any]:
    doc = _manifest()
    del doc[key]
    return doc


def _without_config(key: str) -> dict[str, Any]:
    doc = _manifest()
    del doc["config"][key]
    return doc


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'"manifest"', "not a JSON object"),
        (_raw(_without("config")), "invalid config"),
        (_raw(_without("layers")), "invalid layers"),
        (_raw(_without("schemaVersion")), "invalid schemaVersion"),
        (_raw(_without_config("digest")), "invalid config.digest"),
        (_raw(_without_config("mediaType")), "invalid config.mediaType"),
        (_raw(_without_config("size")), "invalid config.size"),
        (_raw(_manifest(schemaVersion=1)), "invalid schemaVersion"),
        (_raw(_manifest(schemaVersion="2")), "invalid schemaVersion"),
        (_raw(_manifest(layers="none")), "invalid layers"),
        (_raw(_manifest(layers=[1])), "invalid layers.0"),
        (_raw(_manifest(config=[])), "invalid config"),
        (_raw(_manifest(annotations={"a": 1})), "invalid annotations.a"),
        (_raw(_with_config(digest="sha256:abc")), "invalid config.digest"),
        (_raw(_with_config(digest="sha256:" + "A" * 64)), "invalid config.digest"),
        (_raw(_with_config(digest="md5:" + "0" * 32)), "invalid config.digest"),
        (_raw(_with_config(digest="sha256:" + "0" * 64 + "\n")), "invalid config.digest"),
        (_raw(_with_config(size=-1)), "invalid config.size"),
        (_raw(_with_config(size=1.5)), "invalid config.size"),
        (_raw(_with_config(size="12")), "invalid config.size"),
        (_raw(_with_config(size=True)), "invalid config.size"),
        (_raw(_with_config(size=None)), "invalid config.size"),
        (_raw(_with_config(mediaType=5)), "invalid config.mediaType"),
        (_raw(_manifest(mediaType=mediatypes.OCI_INDEX)), "not an image manifest"),
        (
            _raw(_manifest(layers=[{"mediaType": "text/plain", "digest": D1, "size": 1}])),
            "unknown layer media type",
        ),
        (b'{"schemaVersion":2,"config":{"size":NaN}}', "not valid JSON"),
    ],
)
def test_malformed_manifests_are_one_line_errors(data: bytes, message: str) -> None:
    with pytest.raises(MalformedError) as info:
        parse_manifest(data, "docker://reg/app:1")
    text = str(info.value)
    assert text.startswith("docker://reg/app:1: ")
    assert message in text
    assert "\n" not in text


def test_oversized_manifest_and_index_are_refused_before_parsing() -> None:
    big = GO_MANIFEST[:-1] + b',"pad":"' + b"x" * MAX_MANIFEST_SIZE + b'"}'
    with pytest.raises(MalformedError, match="larger than 4 MiB"):
        parse_manifest(big, "m")
    with pytest.raises(MalformedError, match="larger than 4 MiB"):
        parse_index(big, "i")
    exactly = b" " * (MAX_MANIFEST_SIZE - len(GO_MANIFEST)) + GO_MANIFEST
    assert parse_manifest(exactly, "m").to_bytes() == GO_MANIFEST


@pytest.mark.parametrize(
    "doc",
    [
        {"schemaVersion": 2},
        {"schemaVersion": 2, "manifests": {}},
        {"schemaVersion": 2, "manifests": [{"mediaType": "x", "digest": "sha256:0", "size": 1}]},
    ],
)
def test_malformed_index(doc: dict[str, Any]) -> None:
    with pytest.raises(MalformedError, match=r"^oci:/x: invalid manifests"):
        parse_index(_raw(doc), "oci:/x")


def test_media_type_of() -> None:
    assert media_type_of(GO_MANIFEST, "m") == mediatypes.OCI_MANIFEST
    assert media_type_of(b'{"manifests":[]}', "m") == mediatypes.OCI_INDEX
    assert media_type_of(b'{"layers":[]}', "m") == mediatypes.OCI_MANIFEST
    assert media_type_of(b'{"mediaType":"x/y"}', "m") == "x/y"
    with pytest.raises(MalformedError):
        media_type_of(b"[]", "m")


def test_digests() -> None:
    assert sha256_digest(b"abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    verify_digest(b"abc", sha256_digest(b"abc"), "blob")
    verify_digest(b"abc", "sha512:" + hashlib.sha512(b"abc").hexdigest(), "blob")
    with pytest.raises(IntegrityError, match=r"^blob: content does not match its digest"):
        verify_digest(b"abd", sha256_digest(b"abc"), "blob")
    with pytest.raises(MalformedError, match="unsupported digest algorithm 'md5'"):
        verify_digest(b"abc", "md5:" + hashlib.md5(b"abc").hexdigest(), "blob")  # noqa: S324


# -- image configs -----------------------------------------------------------------

# As Docker writes it (Go): two layers made by COPY/RUN, empty-layer steps around.
GO_CONFIG = (
    b'{"architecture":"amd64","config":{"Env":["PATH=/bin"],"Cmd":["sh"]},'
    b'"created":"2024-01-02T03:04:05Z","history":['
    b'{"created":"2024-01-01T00:00:00Z","created_by":"ADD rootfs.tar /"},'
    b'{"created":"2024-01-01T00:00:01Z","created_by":"ENV A=1","empty_layer":true},'
    b'{"created":"2024-01-01T00:00:02Z","created_by":"COPY file:abc123 /secret",'
    b'"comment":"buildkit"},'
    b'{"created":"2024-01-01T00:00:03Z","created_by":"RUN make \\u003e /log"},'
    b'{"created":"2024-01-01T00:00:04Z","created_by":"CMD [\\"sh\\"]","empty_layer":true}],'
    b'"os":"linux","rootfs":{"type":"layers","diff_ids":["'
    + D1.encode()
    + b'","'
    + D2.encode()
    + b'","'
    + D3.encode()
    + b'"]}}'
)


def test_config_reads_diff_ids_and_layer_history() -> None:
    config = ImageConfig(GO_CONFIG)
    assert config.diff_ids == [D1, D2, D3]
    assert [(i, e["created_by"]) for i, e in config.layer_history()] == [
        (0, "ADD rootfs.tar /"),
        (1, "COPY file:abc123 /secret"),
        (2, "RUN make > /log"),
    ]


def test_config_noop_edits_reproduce_the_go_bytes() -> None:
    config = ImageConfig(GO_CONFIG)
    assert config.truncated(3) == GO_CONFIG
    assert config.redacted(set(), "x") == GO_CONFIG


def test_config_truncated_keeps_layers_below_and_their_empty_steps() -> None:
    config = ImageConfig(GO_CONFIG)
    cut = json.loads(config.truncated(2))
    assert cut["rootfs"] == {"type": "layers", "diff_ids": [D1, D2]}
    assert [h["created_by"] for h in cut["history"]] == [
        "ADD rootfs.tar /",
        "ENV A=1",
        "COPY file:abc123 /secret",
    ]
    assert list(cut) == list(json.loads(GO_CONFIG))  # key order kept
    assert json.loads(config.truncated(0))["history"] == []
    assert json.loads(config.truncated(0))["rootfs"]["diff_ids"] == []
    # the original is untouched
    assert config.diff_ids == [D1, D2, D3]
    assert len(config.history) == 5


def test_config_redacted_hides_how_secret_layers_were_built() -> None:
    config = ImageConfig(GO_CONFIG)
    out = json.loads(config.redacted({1, 2}, "encrypted layer"))
    assert out["rootfs"]["diff_ids"] == [D1, D2, D3]
    assert out["history"] == [
        {"created": "2024-01-01T00:00:00Z", "created_by": "ADD rootfs.tar /"},
        {"created": "2024-01-01T00:00:01Z", "created_by": "ENV A=1", "empty_layer": True},
        {"created": "2024-01-01T00:00:02Z", "comment": "encrypted layer"},
        {"created": "2024-01-01T00:00:03Z", "comment": "encrypted layer"},
        {"created": "2024-01-01T00:00:04Z", "created_by": 'CMD ["sh"]', "empty_layer": True},
    ]
    assert b"abc123" not in config.redacted({1}, "x")
    assert config.history[2]["created_by"] == "COPY file:abc123 /secret"  # not mutated


def test_config_without_history() -> None:
    raw = b'{"rootfs":{"type":"layers","diff_ids":["' + D1.encode() + b'"]}}'
    config = ImageConfig(raw)
    assert config.redacted({0}, "x") == raw
    assert config.truncated(0) == b'{"rootfs":{"type":"layers","diff_ids":[]}}'


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"nope", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b"{}", "rootfs.diff_ids is missing"),
        (b'{"rootfs":{"diff_ids":"x"}}', "rootfs.diff_ids is missing"),
        (b'{"rootfs":[]}', "rootfs.diff_ids is missing"),
        (b'{"rootfs":{"diff_ids":[]},"history":{}}', "history is not a list"),
        (b'{"rootfs":{"diff_ids":[]},"history":[1]}', "history is not a list"),
        (b'{"rootfs":{"diff_ids":[]},"x":NaN}', "not valid JSON"),
        (b'{"rootfs":{"diff_ids":[]},"x":1e999}', "not valid JSON"),
    ],
)
def test_malformed_config(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedError, match=f"^config: .*{message}"):
        ImageConfig(raw, "config")


def test_oversized_config() -> None:
    with pytest.raises(MalformedError, match="larger than 16 MiB"):
        ImageConfig(b" " * (MAX_CONFIG_SIZE + 1))
