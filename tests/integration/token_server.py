"""A small registry token server for the tests (the Docker token authentication spec).

The registry's `token` flavour sends clients here. `GET /token?service=S&scope=...`
with HTTP basic credentials of the one configured user returns a JWT signed
with ES256 that grants every requested repository scope; an anonymous request
gets a token granting nothing; wrong credentials get 401. Runs on
127.0.0.1 over TLS with the stdlib ThreadingHTTPServer: no framework needed
for one endpoint.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

from jwcrypto import jwk, jwt

from trustplane.embedded.tls import ServerCertificate, TokenSigningKey, certificate_der_b64

KeyHeader = Literal["kid", "x5c"]
ALLOWED_ACTIONS = frozenset({"pull", "push", "delete", "*"})


@dataclass
class TokenServer:
    """Issues registry bearer tokens for one user; start() before use, stop() after."""

    signer: TokenSigningKey
    tls: ServerCertificate
    service: str
    issuer: str
    username: str
    password: str
    log_file: Path
    lifetime: int = 300
    key_header: KeyHeader = "kid"
    issued: list[dict[str, Any]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("token server not started")
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    @property
    def realm(self) -> str:
        """What the registry's WWW-Authenticate names as realm."""
        return f"{self.url}/token"

    def start(self) -> Self:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        # Handshake in the handler thread, not in accept(), so one slow client blocks nobody.
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def issue(
        self,
        subject: str,
        access: list[dict[str, Any]],
        *,
        key_header: KeyHeader | None = None,
        audience: str | None = None,
        lifetime: int | None = None,
    ) -> str:
        """Sign a registry JWT (the claims of docs/spec/auth/jwt.md)."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience if audience is not None else self.service,
            "exp": now + (lifetime if lifetime is not None else self.lifetime),
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_urlsafe(16),
            "access": access,
        }
        header: dict[str, Any] = {"typ": "JWT", "alg": "ES256"}
        if (key_header or self.key_header) == "kid":
            header["kid"] = self.signer.key_id
        else:
            header["x5c"] = [certificate_der_b64(self.signer.cert_file)]
        key = jwk.JWK.from_pem(self.signer.key_file.read_bytes())
        token = jwt.JWT(header=header, claims=claims)
        token.make_signed_token(key)
        with self._lock:
            self.issued.append(claims)
        serialized: str = token.serialize()
        return serialized

    def check_credentials(self, authorization: str | None) -> str | None:
        """The user name for valid basic credentials, "" for none; None when wrong."""
        if not authorization:
            return ""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user_ok = hmac.compare_digest(user.encode(), self.username.encode())
        password_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return user if user_ok and password_ok else None

    def log(self, line: str) -> None:
        with self._lock, self.log_file.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def parse_scope(scope: str) -> dict[str, Any] | None:
    """`repository:name:pull,push` -> an access entry; names may contain ':' (ports)."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    wanted = [a for a in actions.split(",") if a in ALLOWED_ACTIONS]
    return {"type": kind, "name": name, "actions": wanted}


def _handler_for(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/token":
                self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
                return
            query = parse_qs(url.query)
            if query.get("service", [""])[0] != server.service:
                self._send(400, {"errors": [{"code": "UNSUPPORTED", "message": "unknown service"}]})
                return
            user = server.check_credentials(self.headers.get("Authorization"))
            if user is None:
                self._send(
                    401,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "wrong credentials"}]},
                    {"WWW-Authenticate": 'Basic realm="trustplane-token"'},
                )
                return
            access: list[dict[str, Any]] = []
            if user:  # anonymous callers get a token that grants nothing
                for scope in query.get("scope", []):
                    for part in scope.split(" "):
                        entry = parse_scope(part)
                        if entry is not None and entry["type"] == "repository":
                            access.append(entry)
            token = server.issue(user, access)
            issued_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            self._send(
                200,
                {
                    "token": token,
                    "access_token": token,
                    "expires_in": server.lifetime,
                    "issued_at": issued_at,
                },
            )

        def _send(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            server.log(f"{self.address_string()} {format % args}")

    return Handler
