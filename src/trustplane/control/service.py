"""One control plane instance: everything a request handler may need, wired.

Built once per server process (per uvicorn worker). State shared between
replicas lives in the database: users, nodes, secrets, the log, and the
server's own signing keys (sealed under the KEK, which replicas share).
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwcrypto import jwk
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DuplicateRow

from trustplane.control import migrate
from trustplane.control.attestation import Verifier
from trustplane.control.db import Database
from trustplane.control.identity import (
    Principal,
    TokenAuthority,
    hash_password,
    new_password,
)
from trustplane.control.image_inventory import ImageInventory
from trustplane.control.key_broker import KeyBroker
from trustplane.control.layer_chains import LayerChains
from trustplane.control.models import Setting, User
from trustplane.control.policy import Decision, PolicyFile
from trustplane.control.release import Gate
from trustplane.control.replay import ReplayGuard
from trustplane.control.revocations import Revocations
from trustplane.control.secret_rows import SqlSecretRows
from trustplane.control.secrets import Secrets
from trustplane.control.settings import ServerSettings
from trustplane.control.transparency import TransparencyLog
from trustplane.control.volumes import BlockStorage
from trustplane.errors import UsageError
from trustplane.keys.kek import KekProvider
from trustplane.keys.secret_store import SecretStore
from trustplane.trust.note import NoteSigner

log = logging.getLogger("trustplane.server")
SYSTEM = Principal(kind="user", name="trustplane", role="admin", scopes=frozenset({"*"}))
"""The server itself, as the creator of its own keys."""


@dataclass
class ControlPlane:
    settings: ServerSettings
    db: Database
    kek: KekProvider
    policy: PolicyFile
    log: TransparencyLog
    store: SecretStore
    """The KMS's secret store (keys/): sealed secrets and their ACL."""
    secrets: Secrets
    """The secret store as the API serves it: ACL, policy, log."""
    images: ImageInventory
    broker: KeyBroker
    """The ocicrypt layer-key broker: KMS recipients and unwrap."""
    layer_chains: LayerChains
    """The layer stores' key chains (one per stored image)."""
    tokens: TokenAuthority
    replays: ReplayGuard
    verifier: Verifier
    revocations: Revocations
    volumes: BlockStorage
    """The block-storage service: volume types, volumes, the attach key release."""

    def authorize(
        self, principal: Principal, action: str, resource: str, layer: int | None = None
    ) -> Decision:
        return self.policy.current().decide(principal, action, resource, layer)

    def close(self) -> None:
        self.log.close()
        self.kek.close()
        self.db.close()


def open_kek(settings: ServerSettings) -> KekProvider:
    if settings.kek == "kmip":
        from trustplane.keys.kek_kmip import KmipKekProvider

        kmip = settings.kmip
        if not (kmip.ca_file and kmip.cert_file and kmip.key_file):
            raise UsageError("kek: kmip needs kmip.ca_file, kmip.cert_file and kmip.key_file")
        return KmipKekProvider(
            host=kmip.host,
            port=kmip.port,
            ca_file=kmip.ca_file,
            cert_file=kmip.cert_file,
            key_file=kmip.key_file,
        )
    from trustplane.keys.kek_file import FileKekProvider

    return FileKekProvider(settings.kek_path)


def build(settings: ServerSettings, announce: bool = True) -> ControlPlane:
    """Open (and on first start, create) everything; prints the first admin's
    credential once, when it is created."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(settings.db_url)
    migrate.upgrade(db.engine)
    kek = open_kek(settings)
    policy = PolicyFile(settings.policy_path)

    # The log needs its signing key before the services that log exist: the
    # system keys come straight from the secret store.
    store = SecretStore(SqlSecretRows(db), kek)
    log_key = system_key(db, store, "log_signing_key", new_ed25519_pem)
    token_key = system_key(db, store, "token_signing_key", new_p256_pem)
    origin = _log_origin(db, settings.log_origin)
    signer = NoteSigner(
        origin,
        serialization.load_pem_private_key(log_key, password=None),  # type: ignore[arg-type]
    )
    transparency = TransparencyLog(db, signer, origin, settings.log_batch_wait_ms / 1000)

    def authorize(principal: Principal, action: str, resource: str, layer: int | None) -> Decision:
        return policy.current().decide(principal, action, resource, layer)

    verifier = Verifier(db, transparency, settings.attestation)
    gate = Gate(verifier.gate, verifier.certified_transport_key)
    images = ImageInventory(db, transparency, authorize)
    plane = ControlPlane(
        settings=settings,
        db=db,
        kek=kek,
        policy=policy,
        log=transparency,
        store=store,
        secrets=Secrets(store, transparency, authorize, gate),
        images=images,
        broker=KeyBroker(db, store, images, transparency, authorize, gate),
        layer_chains=LayerChains(db, store, transparency, authorize, gate),
        tokens=TokenAuthority(
            jwk.JWK.from_pem(token_key), settings.token_ttl_seconds, settings.audience
        ),
        replays=ReplayGuard(db),
        verifier=verifier,
        revocations=Revocations(db),
        volumes=BlockStorage(db, store, transparency, authorize, gate, settings),
    )
    plane.revocations.refresh()
    password = _first_admin(db)
    if password is not None and announce:
        print(f"first start: created user 'admin'; one-time credential: {password}", flush=True)
    return plane


def new_ed25519_pem() -> bytes:
    """A new Ed25519 private key, PKCS#8 PEM (log and command signing keys)."""
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_p256_pem() -> bytes:
    """A new P-256 private key, PKCS#8 PEM (the token signing key)."""
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _log_origin(db: Database, configured: str | None) -> str:
    """The log's name, chosen once: a checkpoint's origin must not depend on
    which replica signed it, nor change under the verifiers who pinned it."""
    with db.session() as session:
        stored = session.get(Setting, "log_origin")
    if stored is None:
        try:
            with db.session() as session:
                session.add(
                    Setting(
                        key="log_origin",
                        value=configured or f"trustplane/{socket.gethostname()}",
                    )
                )
        except DuplicateRow:
            pass  # another replica named it first
        with db.session() as session:
            stored = session.get(Setting, "log_origin")
        assert stored is not None
    if configured is not None and configured != stored.value:
        raise UsageError(
            f"log_origin {configured!r} differs from the log's origin {stored.value!r}, "
            "fixed at its first start (checkpoints already name it)"
        )
    return stored.value


def system_key(db: Database, store: SecretStore, name: str, make: Callable[[], bytes]) -> bytes:
    """A key the replicas share: sealed in the secret store, made by whoever starts first."""
    with db.session() as session:
        setting = session.get(Setting, name)
    if setting is None:
        record = store.create(
            SYSTEM,
            name=name,
            secret_type="private",  # noqa: S106 - a kind of secret
            payload=make(),
            system=True,
        )
        try:
            with db.session() as session:
                session.add(Setting(key=name, value=record.id))
        except DuplicateRow:
            store.rows.delete(record.id)  # another replica made it first: use theirs
        with db.session() as session:
            setting = session.get(Setting, name)
        assert setting is not None
    return store.system_payload(setting.value)


def _first_admin(db: Database) -> str | None:
    with db.session() as session:
        if session.scalar(select(User.id).limit(1)) is not None:
            return None
    password = new_password()
    try:
        with db.session() as session:
            session.add(
                User(
                    id=str(uuid.uuid4()),
                    name="admin",
                    role="admin",
                    password_hash=hash_password(password),
                )
            )
    except DuplicateRow:
        return None  # another replica created it
    return password
