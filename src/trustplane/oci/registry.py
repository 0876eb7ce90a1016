"""A client for the OCI distribution API, streaming in both directions.

We evaluated oras-py first. It does not fit: its monolithic upload reads the
whole blob into memory (`data=fd.read()`), uploads take only file paths (no
streaming from another registry or from an encryptor), it has no
cross-repository mount, no resumption of a failed chunk, and it retries every
request, including non-idempotent ones. This client is small on purpose:
httpx does HTTP, TLS and redirects; we do the protocol.

* blobs: HEAD, streamed GET, uploads as one streamed PATCH (as docker push)
  or in PATCH chunks (a failed chunk resumes from the offset the registry
  reports), cancelled (DELETE) when they fail or are interrupted, and
  cross-repository mount;
* manifests: GET with the right Accept list and digest check, PUT;
* auth: Basic over TLS and the Bearer token flow (see auth.py);
* retries with backoff on transient failures (connection errors, 429, 5xx)
  where the request can be replayed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import ipaddress
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import httpx

from trustplane.ca_bundle import client_context
from trustplane.errors import (
    AuthError,
    IntegrityError,
    MalformedError,
    NotFoundError,
    TrustplaneError,
    UnavailableError,
)
from trustplane.oci import mediatypes
from trustplane.oci.auth import Authenticator
from trustplane.oci.credentials import Credentials
from trustplane.oci.model import MAX_MANIFEST_SIZE, verify_digest
from trustplane.streaming import ChunkReader, Readable, iter_chunks, read_upto

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
ATTEMPTS = 4
BACKOFF = 0.25
MAX_RETRY_AFTER = 10.0
DEFAULT_CHUNK = 16 << 20
Body = bytes | Callable[[], Iterator[bytes]]
"""A request body: bytes, or a factory giving a fresh stream for each attempt."""


@dataclass(frozen=True)
class RegistryOptions:
    tls_verify: bool = True
    ca_file: Path | None = None
    credentials: Credentials | None = None
    chunk_size: int | None = None
    """Upload in PATCH chunks of this size; None: one streamed PUT per blob."""
    timeout: float = 60.0


def _body(response: httpx.Response) -> Iterator[bytes]:
    try:
        yield from response.iter_bytes(1 << 20)
    except httpx.TransportError as exc:
        raise UnavailableError(f"registry connection lost while reading: {exc}") from None


@dataclass
class _Upload:
    """An upload session: its Location changes with every chunk."""

    location: str


class RegistryClient:
    """One registry host; thread-compatible, not thread-safe."""

    def __init__(self, host: str, options: RegistryOptions | None = None) -> None:
        self.host = host
        self.options = options or RegistryOptions()
        verify: ssl.SSLContext | bool = self.options.tls_verify
        if self.options.tls_verify:
            verify = client_context(self.options.ca_file)
        self._http = httpx.Client(verify=verify, timeout=self.options.timeout)
        self._auth = Authenticator(host, self.options.credentials)
        self._base: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- discovery ---------------------------------------------------------

    @property
    def base(self) -> str:
        """https://HOST, or http://HOST where plain HTTP is allowed and spoken."""
        if self._base is None:
            self._base = self._probe()
        return self._base

    def _probe(self) -> str:
        schemes = ["https"]
        if not self.options.tls_verify or _is_loopback(self.host):
            schemes.append("http")  # Docker's rule: loopback registries may be plain HTTP
        failure: Exception | None = None
        tls_failure: ssl.SSLError | None = None
        for scheme in schemes:
            try:
                response = self._http.get(f"{scheme}://{self.host}/v2/")
            except httpx.TransportError as exc:
                failure = exc
                tls_failure = tls_failure or _ssl_error(exc)
                continue
            if response.status_code == 401:
                self._auth.learn(response)
            elif response.status_code != 200:
                # A TLS registry answers plain HTTP with 400: the real problem
                # is the certificate that HTTPS could not verify.
                if tls_failure is not None:
                    raise _tls_error(self.host, tls_failure)
                raise UnavailableError(
                    f"{self.host} is not an OCI registry (GET /v2/ gave {response.status_code})"
                )
            return f"{scheme}://{self.host}"
        if tls_failure is not None:
            raise _tls_error(self.host, tls_failure)
        raise UnavailableError(f"registry {self.host} unreachable: {failure}")

    # -- manifests ---------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        """(bytes, media type); checked against `reference` when it is a digest."""
        response = self._request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            scopes=(_scope(repository, "pull"),),
            headers={"Accept": mediatypes.ACCEPT},
            what=f"manifest {repository}:{reference}",
        )
        data = response.content
        if len(data) > MAX_MANIFEST_SIZE:
            raise MalformedError(f"manifest {repository}:{reference} is larger than 4 MiB")
        if reference.startswith("sha256:"):
            verify_digest(data, reference, f"manifest {repository}@{reference}")
        else:
            sent = response.headers.get("Docker-Content-Digest", "")
            if sent.startswith("sha256:") and sent != _sha256(data):
                raise IntegrityError(
                    f"manifest {repository}:{reference} does not match the digest the registry sent"
                )
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return data, media_type

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        self._request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            scopes=(_scope(repository, "pull,push"),),
            headers={"Content-Type": media_type},
            body=data,
            expect=(201,),
            what=f"manifest {repository}:{reference}",
        )
        return _sha256(data)

    # -- blobs -------------------------------------------------------------

    def has_blob(self, repository: str, digest: str) -> bool:
        response = self._request(
            "HEAD",
            f"/v2/{repository}/blobs/{digest}",
            scopes=(_scope(repository, "pull"),),
            expect=(200, 404),
            what=f"blob {digest}",
        )
        return response.status_code == 200

    @contextlib.contextmanager
    def open_blob(self, repository: str, digest: str) -> Iterator[ChunkReader]:
        """Stream a blob. The caller verifies its digest as it reads."""
        response = self._request(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            scopes=(_scope(repository, "pull"),),
            stream=True,
            what=f"blob {digest} in {repository}",
        )
        try:
            yield ChunkReader(_body(response))
        finally:
            response.close()

    def read_small_blob(self, repository: str, digest: str, limit: int) -> bytes:
        """A blob of at most `limit` bytes (a config, a signature payload), verified."""
        with self.open_blob(repository, digest) as stream:
            data = read_upto(stream, limit + 1)
        if len(data) > limit:
            raise MalformedError(f"blob {digest} in {repository} is larger than {limit} bytes")
        verify_digest(data, digest, f"blob in {repository}")
        return data

    def put_small_blob(self, repository: str, data: bytes) -> str:
        """Upload a blob held in memory unless the registry has it; its digest."""
        digest = _sha256(data)
        if not self.has_blob(repository, digest):
            self.upload_blob(
                repository, digest, len(data), lambda: contextlib.nullcontext(io.BytesIO(data))
            )
        return digest

    def mount_blob(self, repository: str, digest: str, source_repository: str) -> bool:
        """Link a blob from another repository of this registry; True if done."""
        response = self._request(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            scopes=(_scope(repository, "pull,push"), _scope(source_repository, "pull")),
            params={"mount": digest, "from": source_repository},
            expect=(201, 202),
            what=f"mount of {digest}",
        )
        if response.status_code == 202:  # not mounted; an upload session was opened instead
            self._cancel(repository, response)
            return False
        return True

    def upload_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        opener: Callable[[], AbstractContextManager[Readable]],
        progress: Callable[[int], object] | None = None,
    ) -> None:
        """Upload `size` bytes from `opener()`, which is called again to retry.

        The registry checks the digest when the upload is finished, so a
        corrupt or truncated stream never becomes a blob.

        By default the bytes go in one streamed PATCH (chunked transfer
        encoding, as `docker push` and skopeo send them), then a PUT with the
        digest. Streamed, the body can be ended cleanly at any piece: when the
        source fails or Ctrl-C is pressed, the registry still answers, with a
        Location on which the session is then deleted. A request broken off
        mid-body cannot be cleaned up that way: distribution keeps the part that
        reached it and refuses every later request on that session (its offset
        no longer matches the state in our Location, BLOB_UPLOAD_INVALID), so the
        part would stay in its `_uploads` until upload purging. A failed upload
        is retried in a new session.
        """
        scopes = (_scope(repository, "pull,push"),)
        chunked = bool(self.options.chunk_size) and size > 0
        failures = 0
        with _interrupts_deferred() as interrupt:
            while True:
                upload = _Upload(self._start_upload(repository, digest))
                try:
                    if chunked:
                        self._patch_chunks(
                            repository, digest, upload, size, opener, progress, interrupt
                        )
                    else:
                        self._stream(repository, digest, upload, size, opener, progress, interrupt)
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    self._request(
                        "PUT",
                        upload.location,
                        scopes=scopes,
                        params={"digest": digest},
                        headers={"Content-Length": "0"},
                        expect=(201,),
                        what=f"upload of {digest}",
                    )
                    return
                except UnavailableError:
                    self._discard(upload.location, scopes)
                    failures += 1
                    if chunked or failures >= ATTEMPTS:
                        raise
                    time.sleep(BACKOFF * 2**failures)
                except BaseException:
                    self._discard(upload.location, scopes)
                    raise

    def _stream(
        self,
        repository: str,
        digest: str,
        upload: _Upload,
        size: int,
        opener: Callable[[], AbstractContextManager[Readable]],
        progress: Callable[[int], object] | None,
        interrupt: _Interrupt,
    ) -> None:
        """PATCH the whole blob as one streamed body. A failure of the source (or
        Ctrl-C while it is read) ends the body where it is; once the registry has
        answered, with a Location the session can be deleted on, it is raised."""
        failure: list[BaseException] = []

        def body() -> Iterator[bytes]:
            try:
                with contextlib.ExitStack() as stack:
                    with interrupt.reading_source():
                        pieces = _exactly(stack.enter_context(opener()), size, progress)
                    while not interrupt.requested:
                        with interrupt.reading_source():
                            piece = next(pieces, None)
                        if piece is None:
                            return
                        yield piece
            except GeneratorExit:  # httpx gave up on the request
                raise
            except BaseException as exc:  # raised once the registry has answered
                failure.append(exc)

        try:
            response = self._request(
                "PATCH",
                upload.location,
                scopes=(_scope(repository, "pull,push"),),
                headers={"Content-Type": "application/octet-stream"},
                body=body,
                expect=(202,),
                what=f"upload of {digest}",
                attempts=1,  # a session a body reached is not resumed: retried in a new one
            )
        except TrustplaneError:
            if failure:
                raise failure[0] from None
            raise
        upload.location = self._location(response)
        if failure:
            raise failure[0]

    def _start_upload(self, repository: str, digest: str) -> str:
        start = self._request(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            scopes=(_scope(repository, "pull,push"),),
            expect=(202,),
            what=f"upload of {digest}",
        )
        return self._location(start)

    def _discard(self, location: str, scopes: tuple[str, ...]) -> None:
        with contextlib.suppress(TrustplaneError, httpx.HTTPError):
            self._http.delete(urljoin(self.base, location), headers=self._auth_header(scopes))

    def _patch_chunks(
        self,
        repository: str,
        digest: str,
        upload: _Upload,
        size: int,
        opener: Callable[[], AbstractContextManager[Readable]],
        progress: Callable[[int], object] | None,
        interrupt: _Interrupt,
    ) -> None:
        """PATCH the blob in chunks; after a failure, ask where the upload
        stands and go on from there with a fresh stream. When the registry
        has dropped the session (a broken chunk reached it in part, which
        distribution answers with BLOB_UPLOAD_INVALID), start a new one.
        Ctrl-C lets the chunk under way finish (or stops the reading of the
        next one), so the session's Location is current for its deletion."""
        chunk_size = self.options.chunk_size or DEFAULT_CHUNK
        scopes = (_scope(repository, "pull,push"),)
        offset = 0
        failures = 0
        while offset < size:
            with opener() as stream:
                with interrupt.reading_source():
                    for _ in _exactly(stream, offset, None):
                        pass  # skip what the registry already holds
                while offset < size:
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    with interrupt.reading_source():
                        data = read_upto(stream, min(chunk_size, size - offset))
                    if not data:
                        raise IntegrityError(f"blob source ended at {offset} of {size} bytes")
                    end = offset + len(data) - 1
                    try:
                        response = self._request(
                            "PATCH",
                            upload.location,
                            scopes=scopes,
                            headers={
                                "Content-Type": "application/octet-stream",
                                "Content-Range": f"{offset}-{end}",
                                "Content-Length": str(len(data)),
                            },
                            # A one-shot stream, not the bytes themselves: httpx's
                            # Response <-> stream reference cycle keeps each Request,
                            # and a bytes body with it, alive until the cyclic GC
                            # runs, which big buffers do not trigger.
                            body=functools.partial(iter, (data,)),
                            expect=(202,),
                            what=f"chunk at byte {offset}",
                            attempts=1,
                        )
                    except UnavailableError as exc:
                        failures += 1
                        if failures >= ATTEMPTS:
                            last = str(exc).removeprefix(f"registry {self.host}: ")
                            raise UnavailableError(
                                f"registry {self.host}: chunked upload of {digest} failed "
                                f"{failures} times; the last one: {last}"
                            ) from None
                        time.sleep(BACKOFF * 2**failures)
                        try:
                            offset, upload.location = self._upload_status(
                                repository, upload.location
                            )
                        except NotFoundError:
                            self._discard(upload.location, scopes)
                            upload.location = self._start_upload(repository, digest)
                            offset = 0
                        break
                    upload.location = self._location(response)
                    offset = end + 1
                    if progress is not None:
                        progress(len(data))

    def _upload_status(self, repository: str, location: str) -> tuple[int, str]:
        """Where the registry says an interrupted upload stands (Range: 0-N),
        and the Location to go on with."""
        response = self._request(
            "GET",
            location,
            scopes=(_scope(repository, "pull,push"),),
            expect=(204,),
            what="upload status",
        )
        header = response.headers.get("Range", "0-0")
        first, _, last = header.partition("-")
        if first != "0" or not last.isdigit():
            raise MalformedError(f"registry {self.host} sent an invalid upload Range {header!r}")
        # Inclusive range, but distribution clamps the end at 0, so an empty
        # upload reads "0-0" as well: take that as nothing received (one
        # stray byte would have invalidated the session's state instead).
        end = int(last)
        return end + 1 if end > 0 else 0, response.headers.get("Location") or location

    def _cancel(self, repository: str, response: httpx.Response) -> None:
        with contextlib.suppress(TrustplaneError, httpx.HTTPError):
            self._http.delete(
                urljoin(self.base, self._location(response)),
                headers=self._auth_header((_scope(repository, "pull,push"),)),
            )

    # -- plumbing ----------------------------------------------------------

    def _auth_header(self, scopes: tuple[str, ...]) -> dict[str, str]:
        return self._auth.header(self._http, scopes)

    def _location(self, response: httpx.Response) -> str:
        location: str = response.headers.get("Location", "")
        if not location:
            raise MalformedError(f"registry {self.host} gave no upload location")
        return location

    def _request(
        self,
        method: str,
        path: str,
        *,
        scopes: tuple[str, ...],
        what: str,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        body: Body | None = None,
        expect: tuple[int, ...] = (200,),
        stream: bool = False,
        attempts: int = ATTEMPTS,
    ) -> httpx.Response:
        url = urljoin(self.base + "/", path)  # paths, and Locations relative or absolute
        replayable = body is None or isinstance(body, bytes) or callable(body)
        last_error = ""
        auth_retried = False
        attempt = 0
        while attempt < attempts:
            attempt += 1
            content = body() if callable(body) else body
            request = self._http.build_request(
                method,
                # Merge, never replace: upload Locations carry their own state query.
                httpx.URL(url).copy_merge_params(params or {}),
                headers={**(headers or {}), **self._auth_header(scopes)},
                content=content,
            )
            try:
                response = self._http.send(request, stream=stream, follow_redirects=True)
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                if not replayable or attempt >= attempts:
                    break
                time.sleep(BACKOFF * 2**attempt)
                continue
            if response.status_code in expect:
                return response
            if stream:
                response.read()
            response.close()
            if response.status_code == 401 and not auth_retried and self._auth.learn(response):
                auth_retried = True
                attempt -= 1  # learning the auth scheme is not a failure
                continue
            if response.status_code in TRANSIENT_STATUS and attempt < attempts:
                time.sleep(_retry_after(response, attempt))
                last_error = f"HTTP {response.status_code}"
                continue
            raise _error_for(response, self.host, what, self._auth)
        raise UnavailableError(
            f"registry {self.host}: {what} failed after {attempt} tries ({last_error})"
        )


class _Interrupt:
    """Ctrl-C (SIGINT) while an upload runs: see `_interrupts_deferred`."""

    def __init__(self) -> None:
        self.requested = False
        self._reading = False

    @contextlib.contextmanager
    def reading_source(self) -> Iterator[None]:
        """While the source is read, Ctrl-C raises at once: a streamed body then
        ends right there, cleanly, and between chunks no request is under way."""
        self._reading = True
        try:
            yield
        finally:
            self._reading = False

    def signalled(self, _signum: int, _frame: object) -> None:
        if self._reading or self.requested:  # nothing half sent, or a second Ctrl-C
            self.requested = True
            raise KeyboardInterrupt
        self.requested = True


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[_Interrupt]:
    """Ctrl-C during an upload stops it between request pieces, not inside one.

    A request broken off mid-body leaves a session nobody can delete (see
    `upload_blob`); so while an upload runs, SIGINT only marks it stopped
    (unless the source is being read, or it is the second Ctrl-C): the
    request under way ends cleanly, the session is deleted, and
    KeyboardInterrupt is raised as usual. Only where Python's own SIGINT
    handler is installed (the main thread of a program that kept it).
    """
    interrupt = _Interrupt()
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield interrupt
        return
    signal.signal(signal.SIGINT, interrupt.signalled)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupt.requested:  # pressed as the upload finished: stop now
        raise KeyboardInterrupt


def _retry_after(response: httpx.Response, attempt: int) -> float:
    header = response.headers.get("Retry-After", "")
    if header.isdigit():
        return min(float(header), MAX_RETRY_AFTER)
    return float(BACKOFF * 2**attempt)


def _error_for(
    response: httpx.Response, host: str, what: str, auth: Authenticator
) -> TrustplaneError:
    detail = ""
    with contextlib.suppress(ValueError, AttributeError, IndexError, TypeError):
        first = response.json()["errors"][0]
        detail = f": {first.get('code', '')} {first.get('message', '')}".rstrip()
    status = response.status_code
    message = f"registry {host}: {what}: HTTP {status}{detail}"
    if status in (401, 403):
        # Say which it was: no credentials, credentials refused, or access denied.
        user = auth.credentials.username if auth.credentials else None
        scheme = auth.challenge.scheme if auth.challenge else None
        if user is None:
            return AuthError(
                f"{message}; the registry wants credentials: give USER:PASSWORD "
                "(--src-creds, --dest-creds) or an auth file"
            )
        if status == 401 and scheme == "basic":
            return AuthError(
                f"registry {host} refused the credentials of {user!r} ({what}: "
                f"HTTP {status}{detail})"
            )
        return AuthError(f"registry {host} denied {what} to {user!r} (HTTP {status}{detail})")
    if status == 404:
        return NotFoundError(message)
    if status == 400 and "DIGEST_INVALID" in detail:
        return IntegrityError(message)
    if status in (400, 413, 415):
        return MalformedError(message)
    return UnavailableError(message)


def _exactly(
    stream: Readable, size: int, progress: Callable[[int], object] | None
) -> Iterator[bytes]:
    try:
        yield from iter_chunks(stream, size, progress)
    except EOFError as exc:
        raise IntegrityError(f"blob source is shorter than its descriptor: {exc}") from None


def _scope(repository: str, actions: str) -> str:
    return f"repository:{repository}:{actions}"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind a transport error, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_error(host: str, failure: ssl.SSLError) -> UnavailableError:
    reason = getattr(failure, "verify_message", None) or failure.reason or str(failure)
    return UnavailableError(
        f"registry {host}: TLS handshake failed ({reason}); give the registry's CA "
        "bundle, or turn TLS verification off for it"
    )


def _is_loopback(host: str) -> bool:
    name = httpx.URL(f"https://{host}/").host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
