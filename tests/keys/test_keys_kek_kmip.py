"""The KMIP KEK provider against a real PyKMIP server (mutual TLS on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kmip_helpers import KmipFactory, provider_for, start_or_fail

from trustplane.embedded.kmip import RunningKmipServer, start_kmip_server
from trustplane.embedded.tls import create_ca, issue_client_cert
from trustplane.errors import (
    AuthError,
    DecryptionKeyError,
    IntegrityError,
    NotFoundError,
    UnavailableError,
    UsageError,
)
from trustplane.keys.envelope import open_sealed, rewrap, seal
from trustplane.keys.kek import WrappedKey
from trustplane.keys.kmip_client import KmipClient, KmipEndpoint

pytestmark = pytest.mark.integration

KEY = os.urandom(32)


def test_wrap_unwrap(kmip_factory: KmipFactory) -> None:
    provider = kmip_factory(cache_ttl=0)
    assert provider.kind == "kmip"
    wrapped = provider.wrap(KEY, b"secret-1")
    assert wrapped.kek_id == provider.current_id()
    assert wrapped.kek_id.startswith("kmip:v0001:")
    assert len(wrapped.blob) == 1 + 12 + 16 + 32
    assert KEY not in wrapped.blob
    assert provider.unwrap(wrapped, b"secret-1") == KEY
    assert provider.wrap(KEY, b"secret-1").blob != wrapped.blob  # fresh nonce


def test_wrong_aad_and_tampering_fail(kmip_factory: KmipFactory) -> None:
    provider = kmip_factory(cache_ttl=0)
    wrapped = provider.wrap(KEY, b"secret-1")
    with pytest.raises(IntegrityError, match="does not authenticate"):
        provider.unwrap(wrapped, b"secret-2")
    for i in (0, 1, 12, 13, 28, 29, len(wrapped.blob) - 1):
        blob = bytearray(wrapped.blob)
        blob[i] ^= 0x01
        with pytest.raises(IntegrityError):
            provider.unwrap(WrappedKey(wrapped.kek_id, bytes(blob)), b"secret-1")


def test_truncated_blob_or_tag_is_refused_before_the_server(kmip_factory: KmipFactory) -> None:
    """PyKMIP would accept a 4-byte tag; our layout check does not let one through."""
    provider = kmip_factory(cache_ttl=0)
    wrapped = provider.wrap(KEY, b"a")
    for cut in (0, 1, 13, 29):
        with pytest.raises(IntegrityError, match="malformed"):
            provider.unwrap(WrappedKey(wrapped.kek_id, wrapped.blob[:cut]), b"a")
    short_tag = wrapped.blob[:13] + wrapped.blob[13:17] + wrapped.blob[29:]
    with pytest.raises(IntegrityError):
        provider.unwrap(WrappedKey(wrapped.kek_id, short_tag), b"a")


def test_rotation_survives_a_provider_restart(
    kmip_server: RunningKmipServer, kmip_factory: KmipFactory
) -> None:
    first = kmip_factory()
    old = first.wrap(KEY, b"a")
    new_id = first.rotate()
    assert new_id.startswith("kmip:v0002:")
    new = first.wrap(KEY, b"a")
    assert new.kek_id == new_id
    group = first.group
    first.close()

    again = kmip_factory(group)
    assert again.current_id() == new_id
    assert again.known_ids() == (old.kek_id, new_id)
    assert again.unwrap(old, b"a") == KEY
    assert again.unwrap(new, b"a") == KEY


def test_replicas_share_rotations(kmip_factory: KmipFactory) -> None:
    one = kmip_factory()
    two = kmip_factory(one.group, refresh_interval=3600.0, cache_ttl=0)
    assert one.current_id() == two.current_id()
    new_id = one.rotate()
    wrapped = one.wrap(KEY, b"a")
    assert two.unwrap(wrapped, b"a") == KEY  # an unknown id makes it look again
    assert two.current_id() == new_id


def test_retire(kmip_factory: KmipFactory) -> None:
    provider = kmip_factory()
    old = provider.wrap(KEY, b"a")
    assert provider.unwrap(old, b"a") == KEY  # now cached too
    with pytest.raises(UsageError, match="current KEK"):
        provider.retire(old.kek_id)
    provider.rotate()
    provider.retire(old.kek_id)
    assert old.kek_id not in provider.known_ids()
    with pytest.raises(DecryptionKeyError):
        provider.unwrap(old, b"a")  # the cache forgot it as well
    with pytest.raises(NotFoundError):
        provider.retire(old.kek_id)
    fresh = kmip_factory(provider.group)
    with pytest.raises(DecryptionKeyError):
        fresh.unwrap(old, b"a")


def test_retired_elsewhere_fails_closed(kmip_factory: KmipFactory) -> None:
    one = kmip_factory(cache_ttl=0)
    two = kmip_factory(one.group, cache_ttl=0)
    old = one.wrap(KEY, b"a")
    assert two.unwrap(old, b"a") == KEY
    one.rotate()
    one.retire(old.kek_id)
    with pytest.raises(DecryptionKeyError):
        two.unwrap(old, b"a")


def test_unwrap_cache(kmip_factory: KmipFactory) -> None:
    provider = kmip_factory(cache_ttl=60)
    wrapped = provider.wrap(KEY, b"a")
    assert provider.unwrap(wrapped, b"a") == KEY
    assert provider.unwrap(wrapped, b"a") == KEY
    assert len(provider._cache) == 1
    with pytest.raises(IntegrityError):
        provider.unwrap(wrapped, b"b")  # other aad misses the cache, the server refuses


def test_envelope_over_kmip(kmip_factory: KmipFactory) -> None:
    kek = kmip_factory()
    sealed = seal("vol/1", b"luks passphrase", kek)
    assert open_sealed("vol/1", sealed, kek) == b"luks passphrase"
    with pytest.raises(IntegrityError):
        open_sealed("vol/2", sealed, kek)
    old = kek.current_id()
    kek.rotate()
    moved = rewrap("vol/1", sealed, kek)
    assert moved.ciphertext == sealed.ciphertext
    assert moved.kek_id != old
    kek.retire(old)
    assert open_sealed("vol/1", moved, kek) == b"luks passphrase"
    with pytest.raises(DecryptionKeyError):
        open_sealed("vol/1", sealed, kek)


def test_server_down_then_back(tmp_path: Path) -> None:
    server = start_or_fail(tmp_path / "kmip")
    try:
        provider = provider_for(server, cache_ttl=0, timeout=3.0)
        wrapped = provider.wrap(KEY, b"a")
        server.stop()
        with pytest.raises(UnavailableError, match=str(server.port)):
            provider.wrap(KEY, b"a")
        with pytest.raises(UnavailableError):
            provider.unwrap(wrapped, b"a")
        with pytest.raises(UnavailableError, match="cannot reach"):
            provider_for(server)
        # Same port, same database: the pool reconnects and the KEK is still there.
        server = start_or_fail(tmp_path / "kmip", port=server.port)
        assert provider.unwrap(wrapped, b"a") == KEY
        provider.close()
    finally:
        server.stop()


def test_client_certificate_from_another_ca_is_refused(
    kmip_server: RunningKmipServer, tmp_path: Path
) -> None:
    stranger = issue_client_cert(create_ca(tmp_path / "ca", "stranger CA"), tmp_path, "stranger")
    with pytest.raises(AuthError, match="refused the TLS handshake"):
        provider_for(kmip_server, cert_file=stranger.cert_file, key_file=stranger.key_file)


def test_certificate_without_client_auth_is_refused(kmip_server: RunningKmipServer) -> None:
    """The server's own certificate (serverAuth only) from the right CA: OpenSSL refuses it."""
    tls = kmip_server.work_dir / "tls"
    with pytest.raises(AuthError, match="unsupported certificate"):
        provider_for(
            kmip_server, cert_file=tls / "kmip-server.pem", key_file=tls / "kmip-server-key.pem"
        )


def test_server_name_is_verified(kmip_server: RunningKmipServer) -> None:
    with pytest.raises(AuthError, match="certificate does not verify"):
        provider_for(kmip_server, server_name="kms.example.org")


def test_another_identity_cannot_use_our_keks(
    kmip_server: RunningKmipServer, kmip_factory: KmipFactory, tmp_path: Path
) -> None:
    ours = kmip_factory(cache_ttl=0)
    wrapped = ours.wrap(KEY, b"a")
    other = issue_client_cert(kmip_server.ca, tmp_path, "other-tenant")
    theirs = kmip_factory(ours.group, cert_file=other.cert_file, key_file=other.key_file)
    assert wrapped.kek_id not in theirs.known_ids()  # Locate shows only their own keys
    with pytest.raises(DecryptionKeyError):
        theirs.unwrap(wrapped, b"a")
    # Even asked directly, the server refuses to use our key for them.
    client = KmipClient(
        KmipEndpoint(
            kmip_server.host,
            kmip_server.port,
            kmip_server.ca_file,
            other.cert_file,
            other.key_file,
        )
    )
    uid = wrapped.kek_id.split(":", 2)[2]
    try:
        with pytest.raises(AuthError, match="permission_denied"):
            client.encrypt_gcm(uid, KEY, os.urandom(12), b"a")
    finally:
        client.close()


def test_bad_tls_files_are_a_usage_error(kmip_server: RunningKmipServer, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot load the KMIP TLS files"):
        provider_for(kmip_server, cert_file=tmp_path / "missing.pem")


def test_a_server_that_cannot_start_is_reported_at_once(
    kmip_server: RunningKmipServer, tmp_path: Path
) -> None:
    """PyKMIP stays alive after failing to bind; the start-up check reads its log instead.

    The readiness wait is a day here: had the failure been noticed only when
    that wait ran out, pytest's own timeout would end the test as a failure.
    """
    with pytest.raises(UnavailableError, match="failed to bind"):
        start_kmip_server(tmp_path / "second", port=kmip_server.port, timeout=24 * 3600)
