"""The control plane's tables.

Secrets are stored only sealed (keys/envelope.py): ciphertext, the wrapped
data key and the id of the KEK that wrapped it; payloads never touch the
database in the clear. The transparency log keeps its leaves, the hashes of
every complete subtree, and one head row (size, right frontier) that the
sequencer locks to append.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import BigInteger, DateTime, Float

BigId = BigInteger().with_variant(Integer(), "sqlite")
"""SQLite's rowid is INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for logs that grow."""


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    disabled: Mapped[bool] = mapped_column(default=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Node(Base):
    """A host or an edge gateway, known by the key pair it signs assertions with."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    public_key: Mapped[str] = mapped_column(Text)
    """PEM; the attestation issue binds it to the node's TPM."""
    key_id: Mapped[str] = mapped_column(String(64), unique=True)
    disabled: Mapped[bool] = mapped_column(default=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Secret(Base):
    __tablename__ = "secrets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(256))
    secret_type: Mapped[str] = mapped_column(String(32))
    algorithm: Mapped[str | None] = mapped_column(String(32))
    bit_length: Mapped[int | None]
    creator: Mapped[str] = mapped_column(String(160))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(128), index=True)
    readers: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Principals besides the creator that the ACL lets read the payload."""
    system: Mapped[bool] = mapped_column(default=False)
    """The server's own keys (token signing, log signing): never served."""


class Recipient(Base):
    """An ocicrypt recipient key pair whose private half stays in the KMS."""

    __tablename__ = "recipients"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64), unique=True)
    public_key: Mapped[str] = mapped_column(Text)
    secret_id: Mapped[str] = mapped_column(ForeignKey("secrets.id"))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    secret: Mapped[Secret] = relationship()


class Image(Base):
    """A published image: which plain layer digests sit at which index."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("repository", "manifest_digest"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    repository: Mapped[str] = mapped_column(String(256), index=True)
    manifest_digest: Mapped[str] = mapped_column(String(140))
    layers: Mapped[list[dict[str, object]]] = mapped_column(JSON)
    """[{index, digest (plain), encrypted, diff_id}]"""
    publisher: Mapped[str] = mapped_column(String(160))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class LayerFiles(Base):
    """Runtime-integrity reference of one registered layer: path -> file digest.

    One row per (image, layer); the map's format is trust/file_digests.py's.
    Reference values never change once stored.
    """

    __tablename__ = "layer_files"
    __table_args__ = (UniqueConstraint("image_id", "layer_index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("images.id", ondelete="CASCADE"), index=True
    )
    layer_index: Mapped[int]
    diff_id: Mapped[str | None] = mapped_column(String(140))
    file_count: Mapped[int]
    files: Mapped[dict[str, str]] = mapped_column(JSON)


class LayerDigest(Base):
    """Plain layer digest -> (image, index): how unwrap learns a layer's real tier."""

    __tablename__ = "layer_digests"
    __table_args__ = (Index("ix_layer_digest", "digest"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(140))
    repository: Mapped[str] = mapped_column(String(256))
    layer_index: Mapped[int]


class LogHead(Base):
    __tablename__ = "log_head"

    id: Mapped[int] = mapped_column(primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    frontier: Mapped[bytes] = mapped_column(LargeBinary)
    root: Mapped[bytes] = mapped_column(LargeBinary)


class LogLeaf(Base):
    __tablename__ = "log_leaves"

    index: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    """The exact bytes hashed into the leaf (canonical JSON)."""


class LogNode(Base):
    """Hash of the complete subtree of 2**level leaves from leaf index * 2**level."""

    __tablename__ = "log_nodes"

    level: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    index: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class Setting(Base):
    """Server-wide facts that replicas share (ids of the system keys, ...)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Revocation(Base):
    """A revoked token (`token_id`), or every token of `subject` issued up to
    `issued_before` (Unix seconds). Kept until `expires`, when every token it
    names has expired anyway. The id orders them: gateways ask for those
    after the last one they have."""

    __tablename__ = "revocations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(160))
    token_id: Mapped[str | None] = mapped_column(String(64))
    issued_before: Mapped[float | None] = mapped_column(Float)
    expires: Mapped[float] = mapped_column(Float, index=True)
    revoker: Mapped[str] = mapped_column(String(160))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class UsedNonce(Base):
    """Single-use values already seen (node assertion ids): replay protection
    that holds across replicas."""

    __tablename__ = "used_nonces"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Attestation(Base):
    """A node's TPM identity, its last attestation result, its current boot and
    whether it is quarantined.

    The AK counts only once `bound` (credential activation proved that the TPM
    holding the EK also holds the AK); the attested state counts only while
    `last_result == "pass"`, `last_at` is recent enough and the node is not
    quarantined (`quarantine_reason`: a failure that means the node measured
    something wrong, kept until an administrator clears it).
    """

    __tablename__ = "attestations"

    node: Mapped[str] = mapped_column(String(128), primary_key=True)
    """The node's name (its principal is `node:<name>`)."""
    ek_public: Mapped[bytes] = mapped_column(LargeBinary)
    """TPMT_PUBLIC of the endorsement key, as the TPM marshals it."""
    ek_cert: Mapped[bytes | None] = mapped_column(LargeBinary)
    ak_public: Mapped[bytes] = mapped_column(LargeBinary)
    ak_name: Mapped[bytes] = mapped_column(LargeBinary)
    pending_ek_public: Mapped[bytes | None] = mapped_column(LargeBinary)
    """An enrolment waiting for activation; the bound EK/AK stay until it succeeds."""
    pending_ek_cert: Mapped[bytes | None] = mapped_column(LargeBinary)
    pending_ak_public: Mapped[bytes | None] = mapped_column(LargeBinary)
    pending_ak_name: Mapped[bytes | None] = mapped_column(LargeBinary)
    challenge_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    """SHA-256 of the secret sealed by MakeCredential, until activated."""
    challenge_expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    bound: Mapped[bool] = mapped_column(default=False)
    bound_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    transport_key: Mapped[str | None] = mapped_column(Text)
    """PEM of the node's transport key, certified by the AK at activation."""
    last_result: Mapped[str | None] = mapped_column(String(8))
    last_reason: Mapped[str | None] = mapped_column(Text)
    last_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    measurements: Mapped[list[dict[str, object]]] = mapped_column(JSON, default=list)
    """Events ({image, manifest, layer, kind, digest}) of the last passing quote."""
    boot_reset_count: Mapped[int | None] = mapped_column(BigInteger)
    """The boot record (trust/boot.py): the AK's last accepted resetCount, ..."""
    boot_restart_count: Mapped[int | None] = mapped_column(BigInteger)
    boot_clock: Mapped[int | None] = mapped_column(BigInteger)
    boot_events: Mapped[int] = mapped_column(BigInteger, default=0)
    """... and the event log accepted in that boot: its length and hash chain."""
    boot_digest: Mapped[bytes | None] = mapped_column(LargeBinary)
    boot_pcrs: Mapped[list[int] | None] = mapped_column(JSON)
    boot_reviewed: Mapped[int] = mapped_column(BigInteger, default=0)
    """Events of this boot's log an administrator reviewed when clearing the node."""
    quarantine_reason: Mapped[str | None] = mapped_column(Text)
    """Why the node gets no keys until an administrator clears it (sticky)."""
    quarantined_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class AttestationNonce(Base):
    """A nonce issued for one quote: single use, short-lived."""

    __tablename__ = "attestation_nonces"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(128))
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class LayerChain(Base):
    """The key chain of one image's layers at rest in a node's layer store.

    Only the top key exists, as a system secret (never served as such); the
    key of layer N is derived from it when the policy allows (layer_chains.py).
    Deleting the row and its secret destroys every layer key: crypto-shredding.
    """

    __tablename__ = "layer_chains"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    repository: Mapped[str] = mapped_column(String(256), index=True)
    manifest_digest: Mapped[str] = mapped_column(String(140))
    layers: Mapped[int]
    secret_id: Mapped[str] = mapped_column(ForeignKey("secrets.id"))
    creator: Mapped[str] = mapped_column(String(160))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class VolumeType(Base):
    """A volume type: a configured backend and its encryption spec (Cinder's fields)."""

    __tablename__ = "volume_types"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    backend: Mapped[str] = mapped_column(String(64))
    """The name of a backend in the server's settings (`volume_backends`)."""
    spec: Mapped[dict[str, object]] = mapped_column(JSON)
    """api.volume_spec.VolumeTypeSpec as JSON: the backend kind and the encryption."""
    creator: Mapped[str] = mapped_column(String(160))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Volume(Base):
    """An encrypted volume: where it is, its key's UUID (never the key), its header.

    `state` makes create and delete safe against a crash: `creating` until
    the storage is formatted, `deleting` once a delete began (the key is
    being destroyed), `shredded` once the key is gone and the storage not
    yet (finished at the next start or delete); `extending` and `rotating`
    while a detached volume grows or gets a new key (no attach meanwhile; put
    back or settled at the next start).
    """

    __tablename__ = "volumes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    type_name: Mapped[str] = mapped_column(ForeignKey("volume_types.name"))
    backend: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), index=True)
    key_id: Mapped[str | None] = mapped_column(String(36))
    """The UUID of the volume's key in the KMS (a secret of the secret store)."""
    location: Mapped[str | None] = mapped_column(Text)
    """api.volume_location as JSON (no secret in it)."""
    engine: Mapped[str | None] = mapped_column(String(16))
    header_uuid: Mapped[str | None] = mapped_column(String(64))
    header_digest: Mapped[str | None] = mapped_column(String(80))
    fingerprint: Mapped[dict[str, object] | None] = mapped_column(JSON)
    """volumes.header.HeaderFingerprint as JSON: checked at every attach."""
    owner: Mapped[str] = mapped_column(String(160))
    attached_to: Mapped[str | None] = mapped_column(String(160))
    """The subject the key was released to for an attach (node:NAME, user:NAME)."""
    attached_domain: Mapped[str | None] = mapped_column(String(128))
    attached_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class VolumeOperation(Base):
    """A long volume operation that copies data (re-encryption, encrypt in place, clone).

    It outlives a crash: the row names the new key and the new storage before
    either exists, and `progress` counts the bytes copied and flushed to the new
    storage, so a restarted server (or a resume) carries on from there or undoes
    what was made. One running operation per volume (`volume_id` is unique); the
    row is deleted once the operation is finished or undone.
    """

    __tablename__ = "volume_operations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id"), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    """What is done: e.g. `reencrypt`, `encrypt`, `clone`."""
    phase: Mapped[str] = mapped_column(String(32))
    """Where the operation is (each kind names its own phases)."""
    key_id: Mapped[str | None] = mapped_column(String(36))
    """The UUID of the new key in the KMS, ordered before the copy starts."""
    target: Mapped[str | None] = mapped_column(Text)
    """api.volume_location of the new storage as JSON (no secret in it)."""
    source: Mapped[dict[str, object] | None] = mapped_column(JSON)
    """What the data comes from when it is not the volume itself (kind-specific)."""
    progress: Mapped[int] = mapped_column(BigInteger, default=0)
    """Bytes copied and flushed to the new storage: a resume starts here."""
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    subject: Mapped[str] = mapped_column(String(160))
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
