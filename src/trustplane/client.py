"""The control plane's HTTP API, as a client for the CLI, agents and gateways.

Errors come back as the server's one-line message with the matching
exception class (401 AuthError, 403 Forbidden, 404 NotFoundError, ...), so
a CLI user sees the server's reason, not an HTTP trace.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any

import httpx

from trustplane.ca_bundle import client_context
from trustplane.errors import (
    AuthError,
    NotFoundError,
    TrustplaneError,
    UnavailableError,
    error_from_http,
)


class ControlClient:
    def __init__(self, url: str, ca_file: Path | None = None, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        verify = client_context(ca_file, "CA certificate")
        self.token = token
        self._http = httpx.Client(base_url=self.url, verify=verify, timeout=30.0)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise AuthError(
                    f"{self.url}: the server's certificate does not verify; give its CA (--ca)"
                ) from None
            raise UnavailableError(f"control plane {self.url} unreachable: {exc}") from None
        except httpx.HTTPError as exc:
            raise UnavailableError(f"control plane {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # -- identity ---------------------------------------------------------------------

    def login(
        self, username: str, password: str, gateways: list[str] | None = None
    ) -> dict[str, Any]:
        """Get a token; `gateways` scopes it to those edge gateways only."""
        request: dict[str, Any] = {
            "grant_type": "password",
            "username": username,
            "password": password,
        }
        if gateways is not None:
            request["gateways"] = gateways
        answer: dict[str, Any] = self.json("POST", "/v1/auth/token", json=request)
        self.token = answer["access_token"]
        return answer

    def login_node(self, node: str, assertion: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.json(
            "POST",
            "/v1/auth/token",
            json={
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "node": node,
                "assertion": assertion,
            },
        )
        self.token = answer["access_token"]
        return answer

    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", "/v1/auth/whoami")
        return result

    def revoke(self, *, subject: str | None = None, token: str | None = None) -> dict[str, Any]:
        """Revoke one token, or every token `subject` (user:NAME, node:NAME) holds."""
        result: dict[str, Any] = self.json(
            "POST", "/v1/auth/revoke", json={"subject": subject, "token": token}
        )
        return result

    def create_user(self, name: str, role: str, password: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.json(
            "POST", "/v1/users", json={"name": name, "role": role, "password": password}
        )
        return result

    def register_node(self, name: str, kind: str, public_key_pem: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json(
            "POST", "/v1/nodes", json={"name": name, "kind": kind, "public_key": public_key_pem}
        )
        return result

    def clear_node(self, name: str, reason: str) -> dict[str, Any]:
        """Lift a node's attestation quarantine (administrators; logged)."""
        result: dict[str, Any] = self.json(
            "POST", f"/v1/attestation/nodes/{name}/clear", json={"reason": reason}
        )
        return result

    # -- policy -------------------------------------------------------------------------

    def authorize(
        self,
        action: str,
        resource: str,
        subject: tuple[str, str] | None = None,
        layer: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"action": action, "resource": resource, "layer": layer}
        if subject is not None:
            body["subject"] = {"kind": subject[0], "name": subject[1]}
        result: dict[str, Any] = self.json("POST", "/v1/authorize", json=body)
        return result

    # -- KMS ----------------------------------------------------------------------------

    def create_secret(
        self,
        payload: bytes | None = None,
        name: str | None = None,
        secret_type: str = "symmetric",  # noqa: S107 - a kind of secret
        readers: list[str] | None = None,
        bit_length: int | None = None,
    ) -> dict[str, Any]:
        body = {
            "name": name,
            "secret_type": secret_type,
            "payload": base64.b64encode(payload).decode() if payload is not None else None,
            "readers": readers or [],
            "bit_length": bit_length,
        }
        result: dict[str, Any] = self.json("POST", "/v1/secrets", json=body)
        return result

    def secret(self, secret_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/v1/secrets/{secret_id}")
        return result

    def secret_payload(self, secret_id: str) -> bytes:
        return self.request("GET", f"/v1/secrets/{secret_id}/payload").content

    def delete_secret(self, secret_id: str) -> None:
        self.request("DELETE", f"/v1/secrets/{secret_id}")

    def rotate_kek(self) -> dict[str, Any]:
        result: dict[str, Any] = self.json("POST", "/v1/kek/rotate")
        return result

    def create_recipient(self, name: str, key_type: str = "ec-p256") -> dict[str, Any]:
        result: dict[str, Any] = self.json(
            "POST", "/v1/recipients", json={"name": name, "key_type": key_type}
        )
        return result

    def recipient(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/v1/recipients/{name}")
        return result

    def unwrap(self, annotation: str, transport_key_pem: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json(
            "POST",
            "/v1/unwrap",
            json={"annotation": annotation, "transport_key": transport_key_pem},
        )
        return result

    def register_image(
        self, repository: str, manifest_digest: str, layers: list[dict[str, Any]]
    ) -> dict[str, Any]:
        result: dict[str, Any] = self.json(
            "POST",
            "/v1/images",
            json={"repository": repository, "manifest_digest": manifest_digest, "layers": layers},
        )
        return result

    def images(self, repository: str) -> list[dict[str, Any]]:
        """What the control plane registered for `repository` (edge gateways ask this)."""
        result: list[dict[str, Any]] = self.json(
            "GET", "/v1/images", params={"repository": repository}
        )
        return result

    def image_files(self, repository: str, manifest_digest: str) -> dict[str, Any]:
        """The file digests registered for one image (runtime integrity)."""
        result: dict[str, Any] = self.json(
            "GET",
            "/v1/images/files",
            params={"repository": repository, "manifest_digest": manifest_digest},
        )
        return result

    def report_drift(self, report: dict[str, Any]) -> dict[str, Any]:
        """Log a running container's drift; the answer's `action` is stop or keep."""
        result: dict[str, Any] = self.json("POST", "/v1/runtime/drift", json=report)
        return result

    def record_signature(
        self,
        repository: str,
        manifest_digest: str,
        payload: bytes,
        signature: bytes,
        public_key_pem: bytes,
    ) -> dict[str, Any]:
        """Have the control plane check an image signature and log it."""
        result: dict[str, Any] = self.json(
            "POST",
            "/v1/signatures",
            json={
                "repository": repository,
                "manifest_digest": manifest_digest,
                "payload": base64.b64encode(payload).decode(),
                "signature": base64.b64encode(signature).decode(),
                "public_key": public_key_pem.decode(),
            },
        )
        return result

    def signatures(self, repository: str, digest: str | None = None) -> list[dict[str, Any]]:
        """The signatures logged for `repository` (and `digest`), as edge gateways read them."""
        params = {"repository": repository, **({"digest": digest} if digest else {})}
        result: list[dict[str, Any]] = self.json("GET", "/v1/signatures", params=params)
        return result

    # -- log ------------------------------------------------------------------------------

    def checkpoint(self) -> bytes:
        return self.request("GET", "/v1/log/checkpoint").content

    def log_key(self) -> dict[str, str]:
        result: dict[str, str] = self.json("GET", "/v1/log/key")
        return result

    def log_entry(self, index: int) -> bytes:
        return base64.b64decode(self.json("GET", f"/v1/log/entries/{index}")["body"])

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
                    raise _error(r)
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
        answer = self.json("GET", "/v1/log/proof/inclusion", params={"index": index, "size": size})
        return [base64.b64decode(h) for h in answer["proof"]]

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        answer = self.json("GET", "/v1/log/proof/consistency", params={"old": old, "new": new})
        return [base64.b64decode(h) for h in answer["proof"]]


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


def _error(response: httpx.Response) -> TrustplaneError:
    """The error table's class for an error answer (errors.py), with the server's message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from_http(response.status_code, body, "control plane")
