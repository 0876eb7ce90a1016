"""The one client of the control plane's HTTP API, for the CLI, agents and gateways.

Each endpoint is written once, as a `Call`: method, path, query, body and
how to read the answer (a model of `trustplane.api`). Two transports send them:
`ControlClient` blocks (httpx.Client; the CLI, the node agent);
`AsyncControlClient` does not (httpx.AsyncClient; the gateway, where one
slow answer must never hold up the other connections). Answers come
back as models; an error answer as the error table's class (errors.py) with
the server's one-line message, so a CLI user sees the server's reason, not an
HTTP trace; an answer that does not fit its model is a MalformedError.

Request bodies are built from the API's models but not validated here: the
server is the one judge of its input, so bad input gets the same answer from
every client, and nothing is refused twice with two different messages.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from jwcrypto import jwk
from pydantic import BaseModel, TypeAdapter, ValidationError

from trustplane.api.attestation import (
    Activated,
    Activation,
    Challenge,
    ClearAnswer,
    ClearRequest,
    Enrollment,
    NonceResponse,
    QuoteRequest,
    QuoteVerdict,
)
from trustplane.api.commands import CommandKey, CommandName, CommandRequest, CommandSent
from trustplane.api.fields import Scalar
from trustplane.api.identity import (
    JWT_BEARER,
    CreatedUser,
    NewNode,
    NewUser,
    NodeInfo,
    Revocations,
    Revoked,
    RevokeRequest,
    TokenRequest,
    TokenResponse,
    WhoAmI,
)
from trustplane.api.images import (
    ImageEntry,
    ImageFiles,
    ImageRecord,
    LayerRecord,
    Registered,
)
from trustplane.api.kms import (
    KekRotated,
    NewRecipient,
    NewSecret,
    RecipientInfo,
    SecretInfo,
    SecretRef,
    SecretType,
    UnwrapRequest,
    UnwrapResponse,
)
from trustplane.api.layer_chains import (
    LayerChainInfo,
    LayerKeyRequest,
    LayerKeyResponse,
    NewLayerChain,
)
from trustplane.api.log import ConsistencyProof, InclusionProof, LogEntry, LogKey
from trustplane.api.ops import Health
from trustplane.api.policy import AuthorizeRequest, AuthorizeResponse, Subject
from trustplane.api.reports import Report, Reports, ReportsLogged
from trustplane.api.runtime import DriftAnswer, DriftReport
from trustplane.api.signatures import SignatureEntry, SignatureLogged, SignatureRecord
from trustplane.api.volume_spec import EncryptionSpec
from trustplane.api.volumes import (
    AttachRequest,
    CloneRequest,
    EncryptRequest,
    ExtendRequest,
    NewVolume,
    NewVolumeType,
    OnlineExtendResult,
    VolumeInfo,
    VolumeKeyRelease,
    VolumeOperationInfo,
    VolumeTypeInfo,
    VolumeVerification,
)
from trustplane.ca_bundle import client_context
from trustplane.crypto.node_assertion import make_node_assertion
from trustplane.errors import (
    AuthError,
    MalformedError,
    TrustplaneError,
    UnavailableError,
    UnreachableError,
    error_from_http,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
Params = Mapping[str, str | int]


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request to the API, and how to read its answer's body."""

    method: str
    path: str
    read: Callable[[bytes], T]
    body: BaseModel | None = None
    params: Params | None = None


# -- reading answers ---------------------------------------------------------------


def _model(kind: type[M]) -> Callable[[bytes], M]:
    return kind.model_validate_json


def _list_of(kind: type[M]) -> Callable[[bytes], list[M]]:
    adapter = TypeAdapter(list[kind])  # type: ignore[valid-type]
    read: Callable[[bytes], list[M]] = adapter.validate_json
    return read


def _bytes(content: bytes) -> bytes:
    return content


def _nothing(_: bytes) -> None:
    return None


def _decoded(proof: InclusionProof | ConsistencyProof) -> list[bytes]:
    return [base64.b64decode(node) for node in proof.proof]


_IMAGES = _list_of(ImageEntry)
_SIGNATURES = _list_of(SignatureEntry)


# -- the endpoints, once ---------------------------------------------------------------


def login_call(username: str, password: str, gateways: Sequence[str] | None) -> Call[TokenResponse]:
    body = TokenRequest.model_construct(
        grant_type="password",
        username=username,
        password=password,
        gateways=list(gateways) if gateways is not None else None,
    )
    return Call("POST", "/v1/auth/token", _model(TokenResponse), body)


def token_audience(url: str) -> str:
    """What a node's assertion names as its audience: the control plane's token URL."""
    return url.rstrip("/") + "/v1/auth/token"


def node_login_call(node: str, assertion: str) -> Call[TokenResponse]:
    """Trade a node's signed assertion (crypto/node_assertion.py) for a token."""
    body = TokenRequest.model_construct(grant_type=JWT_BEARER, node=node, assertion=assertion)
    return Call("POST", "/v1/auth/token", _model(TokenResponse), body)


def whoami_call() -> Call[WhoAmI]:
    return Call("GET", "/v1/auth/whoami", _model(WhoAmI))


def revocations_call(since: int) -> Call[Revocations]:
    """The token revocations after `since` (nodes and admins; gateways ask every second)."""
    return Call("GET", "/v1/auth/revocations", _model(Revocations), params={"since": since})


def authorize_call(
    action: str,
    resource: str,
    subject: tuple[str, str] | None = None,
    layer: int | None = None,
    context: Mapping[str, Scalar] | None = None,
) -> Call[AuthorizeResponse]:
    body = AuthorizeRequest.model_construct(
        subject=(
            Subject.model_construct(kind=subject[0], name=subject[1])  # type: ignore[arg-type]
            if subject
            else None
        ),
        action=action,
        resource=resource,
        layer=layer,
        context=dict(context) if context else None,
    )
    return Call("POST", "/v1/authorize", _model(AuthorizeResponse), body)


def images_call(repository: str) -> Call[list[ImageEntry]]:
    return Call("GET", "/v1/images", _IMAGES, params={"repository": repository})


def signatures_call(repository: str, digest: str | None = None) -> Call[list[SignatureEntry]]:
    params: dict[str, str | int] = {"repository": repository}
    if digest:
        params["digest"] = digest
    return Call("GET", "/v1/signatures", _SIGNATURES, params=params)


def report_call(reports: Sequence[Report]) -> Call[ReportsLogged]:
    body = Reports.model_construct(reports=list(reports))
    return Call("POST", "/v1/reports", _model(ReportsLogged), body)


def command_key_call() -> Call[CommandKey]:
    return Call("GET", "/v1/commands/key", _model(CommandKey))


# -- transports ---------------------------------------------------------------------------


def _arguments(call: Call[Any], token: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    arguments: dict[str, Any] = {"headers": headers}
    if call.body is not None:
        headers["Content-Type"] = "application/json"
        arguments["content"] = call.body.model_dump_json()
    if call.params is not None:
        arguments["params"] = call.params
    return arguments


def _unreachable(url: str, exc: httpx.HTTPError) -> TrustplaneError:
    """A request that got no answer: the control plane is down, or its certificate is wrong."""
    if isinstance(exc, httpx.ConnectError):
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return AuthError(f"{url}: the server's certificate does not verify; give its CA (--ca)")
        return UnreachableError(f"control plane {url} unreachable: {exc}")
    return UnreachableError(f"control plane {url}: {str(exc) or type(exc).__name__}")


def _checked(response: httpx.Response) -> httpx.Response:
    """The response, or the error table's exception for an error answer."""
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        raise error_from_http(response.status_code, body, "control plane")
    return response


def _read(call: Call[T], response: httpx.Response) -> T:
    try:
        return call.read(response.content)
    except ValidationError:
        raise MalformedError(
            f"control plane: the answer to {call.method} {call.path} is malformed"
        ) from None


class ControlClient:
    """The API over a blocking connection; `token` is sent with every request."""

    def __init__(
        self,
        url: str,
        ca_file: Path | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._http = httpx.Client(
            base_url=self.url, verify=client_context(ca_file, "CA certificate"), timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------

    def call(self, call: Call[T]) -> T:
        """Send `call` with this client's token; its answer, read."""
        try:
            response = self._http.request(call.method, call.path, **_arguments(call, self.token))
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from None
        return _read(call, _checked(response))

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A raw request with this client's token, for what is not JSON or not the API's
        (the tests' hand-made bodies); error answers raise like `call`."""
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from None
        return _checked(response)

    # -- identity ---------------------------------------------------------------------

    def login(
        self, username: str, password: str, gateways: Sequence[str] | None = None
    ) -> TokenResponse:
        """Get a token (kept for the next calls); `gateways` scopes it to those gateways."""
        answer = self.call(login_call(username, password, gateways))
        self.token = answer.access_token
        return answer

    def login_node(self, node: str, assertion: str) -> TokenResponse:
        """Get a node's token for a signed assertion (RFC 7523), kept for the next calls."""
        answer = self.call(node_login_call(node, assertion))
        self.token = answer.access_token
        return answer

    def login_as_node(self, node: str, key: jwk.JWK, audience: str | None = None) -> TokenResponse:
        """Log in as `node`: a fresh assertion signed with its key, traded for a token."""
        assertion = make_node_assertion(key, node, audience or token_audience(self.url))
        return self.login_node(node, assertion)

    def whoami(self) -> WhoAmI:
        return self.call(whoami_call())

    def revoke(self, *, subject: str | None = None, token: str | None = None) -> Revoked:
        """Revoke one token, or every token `subject` (user:NAME, node:NAME) holds."""
        body = RevokeRequest.model_construct(subject=subject, token=token)
        return self.call(Call("POST", "/v1/auth/revoke", _model(Revoked), body))

    def revocations(self, since: int = 0) -> Revocations:
        return self.call(revocations_call(since))

    def create_user(self, name: str, role: str, password: str | None = None) -> CreatedUser:
        body = NewUser.model_construct(name=name, role=role, password=password)  # type: ignore[arg-type]
        return self.call(Call("POST", "/v1/users", _model(CreatedUser), body))

    def register_node(self, name: str, kind: str, public_key_pem: str) -> NodeInfo:
        body = NewNode.model_construct(name=name, kind=kind, public_key=public_key_pem)  # type: ignore[arg-type]
        return self.call(Call("POST", "/v1/nodes", _model(NodeInfo), body))

    def nodes(self) -> list[NodeInfo]:
        return self.call(Call("GET", "/v1/nodes", _list_of(NodeInfo)))

    def clear_node(self, name: str, reason: str) -> ClearAnswer:
        """Lift a node's attestation quarantine (administrators; logged)."""
        body = ClearRequest.model_construct(reason=reason)
        path = f"/v1/attestation/nodes/{name}/clear"
        return self.call(Call("POST", path, _model(ClearAnswer), body))

    # -- policy -------------------------------------------------------------------------

    def authorize(
        self,
        action: str,
        resource: str,
        subject: tuple[str, str] | None = None,
        layer: int | None = None,
        context: Mapping[str, Scalar] | None = None,
    ) -> AuthorizeResponse:
        return self.call(authorize_call(action, resource, subject, layer, context))

    # -- KMS ----------------------------------------------------------------------------

    def create_secret(
        self,
        payload: bytes | None = None,
        name: str | None = None,
        secret_type: SecretType = "symmetric",  # noqa: S107 - a kind of secret
        readers: Sequence[str] | None = None,
        bit_length: int | None = None,
    ) -> SecretRef:
        body = NewSecret.model_construct(
            name=name,
            secret_type=secret_type,
            payload=base64.b64encode(payload).decode() if payload is not None else None,
            readers=list(readers or []),
            bit_length=bit_length,
        )
        return self.call(Call("POST", "/v1/secrets", _model(SecretRef), body))

    def secret(self, secret_id: str) -> SecretInfo:
        return self.call(Call("GET", f"/v1/secrets/{secret_id}", _model(SecretInfo)))

    def secret_payload(self, secret_id: str) -> bytes:
        return self.call(Call("GET", f"/v1/secrets/{secret_id}/payload", _bytes))

    def delete_secret(self, secret_id: str) -> None:
        self.call(Call("DELETE", f"/v1/secrets/{secret_id}", _nothing))

    def rotate_kek(self) -> KekRotated:
        return self.call(Call("POST", "/v1/kek/rotate", _model(KekRotated)))

    def create_recipient(self, name: str, key_type: str = "ec-p256") -> RecipientInfo:
        body = NewRecipient.model_construct(name=name, key_type=key_type)  # type: ignore[arg-type]
        return self.call(Call("POST", "/v1/recipients", _model(RecipientInfo), body))

    def recipient(self, name: str) -> RecipientInfo:
        return self.call(Call("GET", f"/v1/recipients/{name}", _model(RecipientInfo)))

    def unwrap(self, annotation: str, transport_key_pem: str) -> UnwrapResponse:
        body = UnwrapRequest.model_construct(annotation=annotation, transport_key=transport_key_pem)
        return self.call(Call("POST", "/v1/unwrap", _model(UnwrapResponse), body))

    # -- layer stores' key chains ---------------------------------------------------------

    def create_layer_chain(
        self, repository: str, manifest_digest: str, layers: int
    ) -> LayerChainInfo:
        """A new key chain (a fresh top key in the KMS) for an image about to be stored."""
        body = NewLayerChain.model_construct(
            repository=repository, manifest_digest=manifest_digest, layers=layers
        )
        return self.call(Call("POST", "/v1/layer-chains", _model(LayerChainInfo), body))

    def layer_chain(self, chain_id: str) -> LayerChainInfo:
        return self.call(Call("GET", f"/v1/layer-chains/{chain_id}", _model(LayerChainInfo)))

    def layer_key(self, chain_id: str, layer: int, transport_key_pem: str) -> LayerKeyResponse:
        """The key of `layer` (it opens layers 0..layer), as a JWE to the transport key."""
        body = LayerKeyRequest.model_construct(layer=layer, transport_key=transport_key_pem)
        path = f"/v1/layer-chains/{chain_id}/keys"
        return self.call(Call("POST", path, _model(LayerKeyResponse), body))

    def delete_layer_chain(self, chain_id: str) -> None:
        """Destroy a chain's top key, and with it every layer key."""
        self.call(Call("DELETE", f"/v1/layer-chains/{chain_id}", _nothing))

    # -- volumes (the block-storage service) ------------------------------------------------

    def create_volume_type(
        self, name: str, backend: str, encryption: EncryptionSpec | None = None
    ) -> VolumeTypeInfo:
        """A volume type on a backend configured on the server (admins); `encryption`
        None: the backend's default."""
        body = NewVolumeType.model_construct(name=name, backend=backend, encryption=encryption)
        return self.call(Call("POST", "/v1/volume-types", _model(VolumeTypeInfo), body))

    def volume_types(self) -> list[VolumeTypeInfo]:
        return self.call(Call("GET", "/v1/volume-types", _list_of(VolumeTypeInfo)))

    def create_volume(self, name: str, size: int, volume_type: str) -> VolumeInfo:
        """Create an encrypted volume of `size` usable bytes (whole MiB); the KMS makes its key."""
        body = NewVolume.model_construct(name=name, size=size, volume_type=volume_type)
        return self.call(Call("POST", "/v1/volumes", _model(VolumeInfo), body))

    def volumes(self) -> list[VolumeInfo]:
        return self.call(Call("GET", "/v1/volumes", _list_of(VolumeInfo)))

    def volume(self, name: str) -> VolumeInfo:
        return self.call(Call("GET", f"/v1/volumes/{name}", _model(VolumeInfo)))

    def delete_volume(self, name: str) -> None:
        """Crypto-shred the volume's key, then destroy its storage."""
        self.call(Call("DELETE", f"/v1/volumes/{name}", _nothing))

    def verify_volume(self, name: str, samples: int | None = None) -> VolumeVerification:
        """The raw storage checked against the record and the type (`passed`, each check)."""
        params = {"samples": str(samples)} if samples is not None else None
        path = f"/v1/volumes/{name}/verification"
        return self.call(Call("GET", path, _model(VolumeVerification), params=params))

    def extend_volume(self, name: str, size: int, domain: str | None = None) -> VolumeInfo:
        """Grow a detached volume to `size` usable bytes (whole MiB); with `domain`, start
        the online extend of the volume attached there (`finish_online_extend` after)."""
        body = ExtendRequest.model_construct(size=size, domain=domain)
        return self.call(Call("POST", f"/v1/volumes/{name}/size", _model(VolumeInfo), body))

    def finish_online_extend(
        self, name: str, domain: str, size: int, *, grown: bool, reason: str | None = None
    ) -> VolumeInfo:
        """Report the block resize of an online extend: the record takes `size` if `grown`."""
        body = OnlineExtendResult(domain=domain, size=size, grown=grown, reason=reason)
        path = f"/v1/volumes/{name}/size/online"
        return self.call(Call("POST", path, _model(VolumeInfo), body))

    def rotate_volume_key(self, name: str) -> VolumeInfo:
        """A new KMS key wraps the volume (its key slot rewritten); the old key is destroyed."""
        path = f"/v1/volumes/{name}/key-rotation"
        return self.call(Call("POST", path, _model(VolumeInfo)))

    def reencrypt_volume(self, name: str) -> VolumeInfo:
        """Copy the detached volume under a new master key and KMS key; the old storage
        and key are destroyed. Waits for the end (no timeout: the copy takes its time)."""
        return self._copy(Call("POST", f"/v1/volumes/{name}/reencryption", _model(VolumeInfo)))

    def reencryption(self, name: str) -> VolumeOperationInfo:
        """The volume's running re-encryption (NotFoundError when none runs)."""
        path = f"/v1/volumes/{name}/reencryption"
        return self.call(Call("GET", path, _model(VolumeOperationInfo)))

    def clone_volume(
        self, name: str, new: str, volume_type: str | None = None, *, snapshot: bool = False
    ) -> VolumeInfo:
        """A copy of detached volume `name` as `new`, under a fresh key of its own."""
        body = CloneRequest.model_construct(name=new, volume_type=volume_type, snapshot=snapshot)
        return self._copy(Call("POST", f"/v1/volumes/{name}/clones", _model(VolumeInfo), body))

    def encrypt_volume(self, source: str, name: str, volume_type: str) -> VolumeInfo:
        """Plaintext storage `source` on the type's backend becomes encrypted volume `name`."""
        body = EncryptRequest.model_construct(name=name, source=source, volume_type=volume_type)
        return self._copy(Call("POST", "/v1/volume-encryptions", _model(VolumeInfo), body))

    def volume_copy(self, name: str) -> VolumeOperationInfo:
        """How far the clone or encryption making volume `name` is."""
        return self.call(Call("GET", f"/v1/volumes/{name}/copy", _model(VolumeOperationInfo)))

    def _copy(self, call: Call[T]) -> T:
        """`call` for a request that copies a volume: the answer comes when the data is
        copied, so no read timeout (connecting and sending keep the client's)."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=None)
        try:
            response = self._http.request(
                call.method, call.path, timeout=timeout, **_arguments(call, self.token)
            )
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from None
        return _read(call, _checked(response))

    def attach_volume(
        self, name: str, domain: str, transport_key_pem: str | None = None
    ) -> VolumeKeyRelease:
        """The volume's record and key for an attach to `domain` (volume.attach; logged),
        wrapped to `transport_key_pem` when given (nodes must: `key_bytes(private)`).
        The attachment is recorded until `detach_volume`."""
        body = AttachRequest.model_construct(domain=domain, transport_key=transport_key_pem)
        path = f"/v1/volumes/{name}/attachment"
        return self.call(Call("POST", path, _model(VolumeKeyRelease), body))

    def detach_volume(self, name: str, domain: str) -> VolumeInfo:
        """Clear the volume's attachment to `domain`."""
        path = f"/v1/volumes/{name}/attachment"
        return self.call(Call("DELETE", path, _model(VolumeInfo), params={"domain": domain}))

    # -- images ---------------------------------------------------------------------------

    def register_image(
        self,
        repository: str,
        manifest_digest: str,
        layers: Sequence[LayerRecord],
    ) -> Registered:
        """Register an image's layers (PublishedLayer: with their file digests)."""
        body = ImageRecord.model_construct(
            repository=repository,
            manifest_digest=manifest_digest,
            layers=list(layers),  # type: ignore[arg-type]  # a LayerRecord has no files: fine
        )
        return self.call(Call("POST", "/v1/images", _model(Registered), body))

    def images(self, repository: str) -> list[ImageEntry]:
        """What the control plane registered for `repository` (edge gateways ask this)."""
        return self.call(images_call(repository))

    def image_files(self, repository: str, manifest_digest: str) -> ImageFiles:
        """The file digests registered for one image (runtime integrity)."""
        params = {"repository": repository, "manifest_digest": manifest_digest}
        return self.call(Call("GET", "/v1/images/files", _model(ImageFiles), params=params))

    def report_drift(self, report: DriftReport) -> DriftAnswer:
        """Log a running container's drift; the answer's `action` is stop or keep."""
        return self.call(Call("POST", "/v1/runtime/drift", _model(DriftAnswer), report))

    def record_signature(
        self,
        repository: str,
        manifest_digest: str,
        payload: bytes,
        signature: bytes,
        public_key_pem: bytes,
    ) -> SignatureLogged:
        """Have the control plane check an image signature and log it."""
        body = SignatureRecord.model_construct(
            repository=repository,
            manifest_digest=manifest_digest,
            payload=base64.b64encode(payload).decode(),
            signature=base64.b64encode(signature).decode(),
            public_key=public_key_pem.decode(),
        )
        return self.call(Call("POST", "/v1/signatures", _model(SignatureLogged), body))

    def signatures(self, repository: str, digest: str | None = None) -> list[SignatureEntry]:
        """The signatures logged for `repository` (and `digest`), as edge gateways read them."""
        return self.call(signatures_call(repository, digest))

    # -- nodes: reports, commands, attestation ----------------------------------------------

    def report(self, reports: Sequence[Report]) -> ReportsLogged:
        """Append a node's own reports to the log (nodes only)."""
        return self.call(report_call(reports))

    def command_key(self) -> CommandKey:
        return self.call(command_key_call())

    def send_command(
        self,
        gateway: str,
        command: CommandName,
        args: Mapping[str, Scalar] | None = None,
        ttl: float = 60,
    ) -> CommandSent:
        """Sign, log and publish a command to a gateway (admins only)."""
        body = CommandRequest.model_construct(
            gateway=gateway, command=command, args=dict(args or {}), ttl=ttl
        )
        return self.call(Call("POST", "/v1/commands", _model(CommandSent), body))

    def enroll(self, enrollment: Enrollment) -> Challenge:
        return self.call(Call("POST", "/v1/attestation/enroll", _model(Challenge), enrollment))

    def activate(self, activation: Activation) -> Activated:
        return self.call(Call("POST", "/v1/attestation/activate", _model(Activated), activation))

    def nonce(self) -> NonceResponse:
        return self.call(Call("GET", "/v1/attestation/nonce", _model(NonceResponse)))

    def quote(self, quote: QuoteRequest) -> QuoteVerdict:
        return self.call(Call("POST", "/v1/attestation/quote", _model(QuoteVerdict), quote))

    # -- log and health -------------------------------------------------------------------

    def health(self) -> Health:
        return self.call(Call("GET", "/healthz", _model(Health)))

    def checkpoint(self) -> bytes:
        return self.call(Call("GET", "/v1/log/checkpoint", _bytes))

    def log_key(self) -> LogKey:
        return self.call(Call("GET", "/v1/log/key", _model(LogKey)))

    def log_entry(self, index: int) -> bytes:
        """The leaf's bytes, exactly as the Merkle tree hashes them."""
        entry = self.call(Call("GET", f"/v1/log/entries/{index}", _model(LogEntry)))
        return base64.b64decode(entry.body)

    def log_entries(self, start: int, end: int) -> Iterator[list[bytes]]:
        """The bodies of entries [start, end), a chunk at a time as they stream in
        (the server's `frame_entries` format).

        A clean answer that ends early stops early (the caller names the
        missing entry); one that breaks off is an UnavailableError.
        """
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        params = {"start": start, "end": end}
        try:
            with self._http.stream("GET", "/v1/log/entries", params=params, headers=headers) as r:
                if r.status_code >= 400:
                    r.read()
                    _checked(r)  # raises the error table's class
                pending = b""
                for piece in r.iter_bytes(1 << 20):
                    pending = pending + piece if pending else piece
                    while (chunk := _take_chunk(pending)) is not None:
                        bodies, used = chunk
                        pending = pending[used:]
                        yield bodies
                if pending:
                    raise UnavailableError(f"control plane {self.url}: a log entry was cut off")
        except httpx.HTTPError as exc:
            raise UnavailableError(
                f"control plane {self.url}: the log's answer broke off: {exc}"
            ) from None

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        params = {"index": index, "size": size}
        return _decoded(
            self.call(Call("GET", "/v1/log/proof/inclusion", _model(InclusionProof), None, params))
        )

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        params = {"old": old, "new": new}
        return _decoded(
            self.call(
                Call("GET", "/v1/log/proof/consistency", _model(ConsistencyProof), None, params)
            )
        )


def connect_as_node(
    url: str, node: str, key: jwk.JWK, ca_file: Path | None = None, audience: str | None = None
) -> ControlClient:
    """A client logged in as `node` (a fresh single-use assertion signed with its key)."""
    client = ControlClient(url, ca_file)
    try:
        client.login_as_node(node, key, audience)
    except BaseException:
        client.close()
        raise
    return client


class AsyncControlClient:
    """The API over an asynchronous connection, for the gateway.

    Each call names the token it goes with: the gateway asks with its own
    and checks its callers' tokens with theirs. The endpoints are the same
    `Call`s the blocking client sends (gateway/control_link.py adds the
    gateway's caching and identity on top).
    """

    def __init__(self, url: str, ca_file: Path | None = None, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url, verify=client_context(ca_file, "CA certificate"), timeout=timeout
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def call(self, call: Call[T], token: str | None) -> T:
        """Send `call` with `token` (None: none); its answer, read."""
        try:
            response = await self._http.request(call.method, call.path, **_arguments(call, token))
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from None
        return _read(call, _checked(response))


def _take_chunk(data: bytes) -> tuple[list[bytes], int] | None:
    """One whole chunk of the log's entries stream at the start of `data`:
    (the bodies, the bytes it took), or None while it is incomplete."""
    if len(data) < 4:
        return None
    (count,) = struct.unpack_from(">I", data)
    header = 4 + 4 * count
    if len(data) < header:
        return None
    offsets = list(accumulate(struct.unpack_from(f">{count}I", data, 4), initial=header))
    if len(data) < offsets[-1]:
        return None
    return [data[a:b] for a, b in pairwise(offsets)], offsets[-1]
