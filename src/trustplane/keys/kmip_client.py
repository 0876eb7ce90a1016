"""A small, thread-safe KMIP 1.4 client for the operations the KMS needs.

PyKMIP encodes and decodes the messages (TTLV); the transport is ours, for
four reasons its `ProxyKmipClient` cannot give us:

- authenticated encryption: its `encrypt`/`decrypt` drop the KMIP 1.4
  fields (associated data, authentication tag) the KEK construction needs,
  although its message payloads carry them;
- TLS: it builds an `SSLContext` without hostname verification (any
  certificate from the CA would pass as the server); ours verifies the
  server name, requires TLS 1.2+ with ECDHE and AEAD ciphers, and presents
  the client certificate;
- speed and threads: one connection per client object, no locking; we keep
  a pool of persistent connections shared by all threads;
- secrecy: its framing layer can log whole messages (data keys) at DEBUG.

Every failure is a TrustplaneError: UnavailableError when the server cannot
be reached or drops the connection, AuthError when TLS or the server rejects
our identity, NotFoundError for a missing object, and `KmipOperationError`
(an UnavailableError carrying the KMIP result reason) for anything else the
server refuses.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmip.core import (  # type: ignore[import-untyped, unused-ignore]
    enums,
    objects,
    primitives,
    utils,
)
from kmip.core.attributes import (  # type: ignore[import-untyped, unused-ignore]
    CryptographicParameters,
)
from kmip.core.factories.attributes import (  # type: ignore[import-untyped, unused-ignore]
    AttributeFactory,
)
from kmip.core.messages import (  # type: ignore[import-untyped, unused-ignore]
    contents,
    messages,
    payloads,
)

from trustplane.errors import AuthError, NotFoundError, UnavailableError, UsageError

KMIP_VERSION = enums.KMIPVersion.KMIP_1_4
"""1.4 is the first version whose Encrypt/Decrypt carry associated data and tag."""
DEFAULT_PORT = 5696
DEFAULT_POOL_SIZE = 4
DEFAULT_TIMEOUT = 10.0
MAX_RESPONSE = 1 << 20
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_HEADER = 8  # TTLV tag (3) + type (1) + length (4)
_AUTH_REASONS = {"AUTHENTICATION_NOT_SUCCESSFUL", "PERMISSION_DENIED"}


class KmipOperationError(UnavailableError):
    """The server answered and refused or failed an operation; `reason` is the KMIP reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class KmipEndpoint:
    """Where a KMIP server is and how we prove who we are to it (mutual TLS).

    `server_name` is the name or address its certificate must carry
    (defaults to `host`).
    """

    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    server_name: str | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class _Broken(Exception):
    """The connection failed mid-request; the request may or may not have run."""


class _Connection:
    """One TLS connection speaking KMIP: request out, one response in."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.used = False

    def roundtrip(self, request: bytes) -> bytes:
        self.used = True
        try:
            self.sock.sendall(request)
            header = self._read(_HEADER)
            length = int.from_bytes(header[4:8], "big")
            if length > MAX_RESPONSE:
                raise _Broken(f"response of {length} bytes is too large")
            return header + self._read(length)
        except ssl.SSLError as exc:
            if _is_tls_alert(exc):
                raise AuthError(f"KMIP server ended the TLS session: {_ssl_reason(exc)}") from None
            raise _Broken(str(exc)) from None
        except OSError as exc:
            raise _Broken(exc.strerror or type(exc).__name__) from None

    def _read(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self.sock.recv(size - len(chunks))
            if not chunk:
                raise _Broken("connection closed by the server")
            chunks += chunk
        return bytes(chunks)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class KmipClient:
    """Thread-safe KMIP client over a pool of persistent mutual-TLS connections."""

    def __init__(
        self,
        endpoint: KmipEndpoint,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if pool_size < 1:
            raise UsageError("the KMIP connection pool needs at least one connection")
        self.endpoint = endpoint
        self.timeout = timeout
        self._pool_size = pool_size
        self._context = _tls_context(endpoint)
        self._cond = threading.Condition()
        self._idle: list[_Connection] = []
        self._open = 0
        self._closed = False
        self._attributes = AttributeFactory()

    # -- operations --------------------------------------------------------

    def create_aes_key(self, name: str, group: str, *, bits: int = 256) -> str:
        """Create and activate a server-side AES key usable only to encrypt and decrypt.

        Two messages: PyKMIP cannot parse an Activate that relies on the ID
        placeholder of a Create in the same batch. A failed Activate leaves a
        pre-active key that nothing locates. The key is marked Sensitive.
        """
        attrs = [
            self._attr(
                enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM, enums.CryptographicAlgorithm.AES
            ),
            self._attr(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, bits),
            self._attr(
                enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK,
                [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT],
            ),
            self._attr(enums.AttributeType.NAME, name),
            self._attr(enums.AttributeType.OBJECT_GROUP, group),
            self._attr(enums.AttributeType.SENSITIVE, True),
        ]
        create = payloads.CreateRequestPayload(
            object_type=enums.ObjectType.SYMMETRIC_KEY,
            template_attribute=objects.TemplateAttribute(attributes=attrs),
        )
        (created,) = self._batch([(enums.Operation.CREATE, create)], retry=False)
        uid = _text(created.unique_identifier)
        activate = payloads.ActivateRequestPayload(unique_identifier=_unique_identifier(uid))
        self._batch([(enums.Operation.ACTIVATE, activate)], retry=False)
        return uid

    def locate_active(self, group: str) -> list[str]:
        """Ids of the active objects in `group` that this client may use."""
        payload = payloads.LocateRequestPayload(
            attributes=[
                self._attr(enums.AttributeType.OBJECT_GROUP, group),
                self._attr(enums.AttributeType.STATE, enums.State.ACTIVE),
            ]
        )
        (result,) = self._batch([(enums.Operation.LOCATE, payload)])
        return [_text(uid) for uid in (result.unique_identifiers or [])]

    def names(self, uids: Sequence[str]) -> dict[str, list[str]]:
        """The Name attributes of each object, in one request."""
        if not uids:
            return {}
        requests = [
            (
                enums.Operation.GET_ATTRIBUTES,
                payloads.GetAttributesRequestPayload(
                    unique_identifier=uid, attribute_names=["Name"]
                ),
            )
            for uid in uids
        ]
        results = self._batch(requests)
        found: dict[str, list[str]] = {}
        for uid, result in zip(uids, results, strict=True):
            found[uid] = [
                _text(attr.attribute_value.name_value.value)
                for attr in (result.attributes or [])
                if _text(attr.attribute_name.value) == "Name"
            ]
        return found

    def encrypt_gcm(self, uid: str, data: bytes, nonce: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-GCM under server key `uid`: returns (ciphertext, 16-byte tag)."""
        payload = payloads.EncryptRequestPayload(
            unique_identifier=uid,
            cryptographic_parameters=_gcm_parameters(),
            data=data,
            iv_counter_nonce=nonce,
            auth_additional_data=aad,
        )
        (result,) = self._batch([(enums.Operation.ENCRYPT, payload)])
        ciphertext, tag = result.data, result.auth_tag
        if not isinstance(ciphertext, bytes) or not isinstance(tag, bytes) or len(tag) != 16:
            raise KmipOperationError(
                f"KMIP server {self.endpoint} returned no AES-GCM tag for Encrypt", "NO_TAG"
            )
        return ciphertext, tag

    def decrypt_gcm(
        self, uid: str, ciphertext: bytes, nonce: bytes, aad: bytes, tag: bytes
    ) -> bytes:
        """AES-GCM decryption under server key `uid`; the server checks the tag."""
        payload = payloads.DecryptRequestPayload(
            unique_identifier=uid,
            cryptographic_parameters=_gcm_parameters(),
            data=ciphertext,
            iv_counter_nonce=nonce,
            auth_additional_data=aad,
            auth_tag=tag,
        )
        (result,) = self._batch([(enums.Operation.DECRYPT, payload)])
        plain = result.data
        if not isinstance(plain, bytes):
            raise KmipOperationError(f"KMIP server {self.endpoint} returned no data", "NO_DATA")
        return plain

    def revoke_and_destroy(self, uid: str) -> None:
        """Take key `uid` out of use for good: Revoke (superseded), then Destroy."""
        revoke = payloads.RevokeRequestPayload(
            unique_identifier=_unique_identifier(uid),
            revocation_reason=objects.RevocationReason(code=enums.RevocationReasonCode.SUPERSEDED),
        )
        self._batch([(enums.Operation.REVOKE, revoke)], retry=False)
        destroy = payloads.DestroyRequestPayload(unique_identifier=_unique_identifier(uid))
        self._batch([(enums.Operation.DESTROY, destroy)], retry=False)

    def close(self) -> None:
        """Close every pooled connection; later calls raise UsageError. Idempotent."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    # -- messages ----------------------------------------------------------

    def _attr(self, kind: Any, value: object) -> Any:
        return self._attributes.create_attribute(kind, value)

    def _batch(self, items: Sequence[tuple[Any, Any]], *, retry: bool = True) -> list[Any]:
        """Send one request message with these batch items; return their payloads in order.

        `retry`: the operations are safe to repeat, so a pooled connection
        the server dropped while idle is replaced transparently. Operations
        that change state are never repeated and use a fresh connection.
        """
        request = _encode_request(items)
        data = self._roundtrip(request, retry=retry)
        response = messages.ResponseMessage()
        try:
            response.read(utils.BytearrayStream(data), KMIP_VERSION)
        except Exception as exc:  # PyKMIP raises anything on malformed input
            raise UnavailableError(
                f"KMIP server {self.endpoint} sent a response we cannot parse: {exc}"
            ) from None
        results = []
        for (operation, _), item in zip(items, response.batch_items or [], strict=False):
            status = item.result_status.value if item.result_status is not None else None
            if status != enums.ResultStatus.SUCCESS:
                raise self._failure(operation, item)
            results.append(item.response_payload)
        if len(results) != len(items):
            raise UnavailableError(
                f"KMIP server {self.endpoint} answered {len(results)} of {len(items)} operations"
            )
        return results

    def _failure(self, operation: Any, item: Any) -> Exception:
        reason_enum = item.result_reason.value if item.result_reason is not None else None
        reason = reason_enum.name if reason_enum is not None else "UNKNOWN"
        message = item.result_message.value if item.result_message is not None else ""
        what = f"KMIP {_op_name(operation)} on {self.endpoint}: {reason.lower()}: {message}"
        if reason in _AUTH_REASONS:
            return AuthError(f"{what} (check the client certificate and key ownership)")
        if reason == "ITEM_NOT_FOUND":
            return NotFoundError(what)
        return KmipOperationError(what, reason)

    # -- connections -------------------------------------------------------

    def _roundtrip(self, request: bytes, *, retry: bool) -> bytes:
        if not retry:
            conn = self._connect()
            try:
                return conn.roundtrip(request)
            except _Broken as exc:
                raise self._lost(exc) from None
            finally:
                conn.close()
        for _ in range(2):
            conn = self._acquire()
            reused = conn.used
            try:
                data = conn.roundtrip(request)
            except _Broken as exc:
                self._release(conn, broken=True)
                if reused:
                    self._drop_idle()  # the server restarted or timed them all out
                    continue
                raise self._lost(exc) from None
            except BaseException:
                self._release(conn, broken=True)
                raise
            self._release(conn, broken=False)
            return data
        raise UnavailableError(f"KMIP server {self.endpoint} keeps dropping connections")

    def _lost(self, exc: _Broken) -> UnavailableError:
        return UnavailableError(f"lost the connection to KMIP server {self.endpoint}: {exc}")

    def _acquire(self) -> _Connection:
        with self._cond:
            while True:
                if self._closed:
                    raise UsageError(f"the KMIP client for {self.endpoint} is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._pool_size:
                    self._open += 1
                    break
                self._cond.wait()
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _release(self, conn: _Connection, *, broken: bool) -> None:
        with self._cond:
            if broken or self._closed:
                self._open -= 1
                conn.close()
            else:
                self._idle.append(conn)
            self._cond.notify()

    def _drop_idle(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def _connect(self) -> _Connection:
        ep = self.endpoint
        try:
            raw = socket.create_connection((ep.host, ep.port), timeout=self.timeout)
        except OSError as exc:
            raise UnavailableError(
                f"cannot reach KMIP server {ep}: {exc.strerror or type(exc).__name__}"
            ) from None
        try:
            sock = self._context.wrap_socket(raw, server_hostname=ep.server_name or ep.host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise AuthError(
                f"KMIP server {ep} certificate does not verify: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raw.close()
            raise AuthError(
                f"KMIP server {ep} refused the TLS handshake ({_ssl_reason(exc)}); "
                "does it trust our client certificate's CA, and is the certificate for clientAuth?"
            ) from None
        except OSError as exc:
            raw.close()
            raise UnavailableError(
                f"TLS handshake with KMIP server {ep} failed: {exc.strerror or exc}"
            ) from None
        return _Connection(sock)


def _tls_context(endpoint: KmipEndpoint) -> ssl.SSLContext:
    """Mutual TLS 1.2+, server certificate and name verified against our CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_verify_locations(cafile=str(endpoint.ca_file))
        context.load_cert_chain(str(endpoint.cert_file), str(endpoint.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"cannot load the KMIP TLS files (CA {endpoint.ca_file}, certificate "
            f"{endpoint.cert_file}, key {endpoint.key_file}): {exc}"
        ) from None
    return context


def _encode_request(items: Sequence[tuple[Any, Any]]) -> bytes:
    batch = [
        messages.RequestBatchItem(
            operation=primitives.Enumeration(enums.Operation, op, tag=enums.Tags.OPERATION),
            unique_batch_item_id=(
                contents.UniqueBatchItemID(i.to_bytes(4, "big")) if len(items) > 1 else None
            ),
            request_payload=payload,
        )
        for i, (op, payload) in enumerate(items)
    ]
    header = messages.RequestHeader(
        protocol_version=contents.ProtocolVersion(1, 4),
        batch_count=contents.BatchCount(len(batch)),
        batch_error_cont_option=contents.BatchErrorContinuationOption(
            enums.BatchErrorContinuationOption.STOP
        ),
    )
    stream = utils.BytearrayStream()
    messages.RequestMessage(request_header=header, batch_items=batch).write(stream, KMIP_VERSION)
    return bytes(stream.buffer)


def _gcm_parameters() -> Any:
    return CryptographicParameters(
        block_cipher_mode=enums.BlockCipherMode.GCM,
        cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
        tag_length=16,
    )


def _unique_identifier(uid: str) -> Any:
    from kmip.core.attributes import UniqueIdentifier  # type: ignore[import-untyped, unused-ignore]

    return UniqueIdentifier(uid)


def _op_name(operation: Any) -> str:
    name = getattr(operation, "name", str(operation))
    return "".join(part.capitalize() for part in str(name).split("_"))


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise UnavailableError(f"KMIP server sent {type(value).__name__} where text belongs")
    return value


def _is_tls_alert(exc: ssl.SSLError) -> bool:
    reason = (exc.reason or "").upper()
    return "ALERT" in reason or "CERTIFICATE" in reason


def _ssl_reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).lower().replace("_", " ")
