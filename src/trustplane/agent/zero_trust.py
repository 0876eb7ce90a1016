"""Zero-trust start (`trustplane run`): a container starts on this node only
when the image's signature is valid, its layers match the reference
measurements registered with the control plane, the node is attested with
those layers measured into its TPM, and the policy authorizes the start.

The steps, in order; each refusal is one error whose message starts with
the check that failed (`signature:`, `measurement:`, `attestation:`,
`authorization:`):

1. signature: cosign's `.sig` tag, with the given public key. From here on
   the image is pinned to the signed manifest digest.
2. the reference measurements of that digest (GET /v1/images).
3. measure, then compare: under the node's TPM lock (tpm_lock.py), each
   layer's diff_id (from the signed config) and each plain layer's blob
   digest (from the signed manifest) is extended into the PCR with an
   event-log entry, then compared with the references. The measurement is
   made first on purpose: a signed image that does not match its
   registration leaves its mark in the PCR (which nobody resets without a
   reboot), and the node quotes at once so that the verifier records the
   mismatch: the node is quarantined until an administrator clears it.
4. attest (fresh nonce, quote): the KMS may release layer keys only to a
   node whose fresh quote shows the image's layers.
5. pull and decrypt into a private directory, with the layer keys from the
   KMS, unwrapped with the transport key the TPM certified; then the plain
   blob digest of every encrypted layer is measured and compared, and every
   layer's diff_id is recomputed from its content.
6. attest again: the verifier sees every measured layer.
7. authorize `container.start` on `image:REPOSITORY` (what the edge gateway
   asks for a container create too).
8. `docker load` the checked image, create the container from its image id
   (not a tag that could move) and start it.

A refusal leaves nothing behind: no loaded image, no container, no
temporary files. (The event-log entries stay: they are the node's record.)
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustplane.agent.attester import Attester
from trustplane.agent.service import Agent, AgentConfig
from trustplane.agent.tpm_lock import node_tpm
from trustplane.api.images import LayerRecord
from trustplane.client import ControlClient
from trustplane.crypto.signing import VerifyKey
from trustplane.errors import (
    AuthError,
    Forbidden,
    IntegrityError,
    MalformedError,
    TrustplaneError,
    UnavailableError,
    UsageError,
)
from trustplane.images.decrypt import DecryptRequest, decrypt_image
from trustplane.images.kms_unwrap import KmsUnwrapper
from trustplane.images.resolve import resolve
from trustplane.images.sign import verify_image
from trustplane.oci import daemon, docker_archive, mediatypes
from trustplane.oci.compression import DECOMPRESSION_ERRORS, decompressed
from trustplane.oci.layout import Layout, blob_path
from trustplane.oci.model import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageConfig,
    parse_manifest,
)
from trustplane.oci.reference import LayoutRef, RegistryRef
from trustplane.oci.transport import Endpoint, open_source
from trustplane.progress import SILENT, Reporter
from trustplane.trust.attestation import Event

START_ACTION = "container.start"
LABEL_IMAGE = "org.trustplane.image"
LABEL_MANIFEST = "org.trustplane.manifest"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RunRequest:
    image: RegistryRef
    key: VerifyKey
    """The publisher's public key (cosign.pub)."""
    node: AgentConfig
    """This node's identity: control plane, node key, TPM, state directory."""
    docker_url: str = "unix:///var/run/docker.sock"
    name: str | None = None
    command: Sequence[str] = ()
    endpoint: Endpoint = field(default_factory=Endpoint)


@dataclass(frozen=True)
class Started:
    container_id: str
    name: str
    image_id: str
    repository: str
    manifest_digest: str
    attestation: str
    authorization_log_index: int


Say = Callable[[str], object]


def _quiet(_: str) -> None:
    return None


def refused(check: str, error: TrustplaneError) -> TrustplaneError:
    """The same kind of error (and exit code), its message naming the check."""
    return type(error)(f"{check}: {error}")


def run_image(request: RunRequest, reporter: Reporter = SILENT, say: Say = _quiet) -> Started:
    """Check everything, then start the container; see the module docstring."""
    node = Agent(request.node)
    repository = request.image.name  # canonical: as registered and measured

    # 1. signature
    try:
        digest = verify_image(request.image, request.key, request.endpoint).manifest_digest
    except (IntegrityError, MalformedError) as exc:
        raise refused("signature", exc) from None
    pinned = RegistryRef(request.image.host, request.image.repository, None, digest)
    say(f"signature: {request.image} ({digest}) is signed by {request.key.source}")

    with node.client() as client:
        # 2. the reference measurements
        references = _references(client, repository, digest)
        source = open_source(pinned, request.endpoint)
        try:
            image = resolve(source)
        finally:
            source.close()
        layers = image.manifest.layers
        diff_ids = ImageConfig(image.config, f"{pinned}: config").diff_ids
        if len(references) != len(layers) or len(diff_ids) != len(layers):
            raise IntegrityError(
                f"measurement: {repository}@{digest} has {len(layers)} layers and "
                f"{len(diff_ids)} diff_ids; {len(references)} are registered"
            )

        # 3. measure what the signed manifest and config commit to, then compare
        events = [
            _event(request, repository, digest, i, "diff_id", diff_id)
            for i, diff_id in enumerate(diff_ids)
        ]
        events += [
            _event(request, repository, digest, i, "blob", layer.digest)
            for i, layer in enumerate(layers)
            if not layer.is_encrypted
        ]
        with _attester(request, node) as attester:
            _measure(attester, events)
        _compare_or_report(request, node, client, events, references, repository)
        say(f"measurement: {len(layers)} layers of {repository} match the reference")

        # 4. attest, so that the KMS releases the layer keys
        _attest(request, node, client)

        work = Path(tempfile.mkdtemp(prefix="trustplane-run-"))
        try:
            # 5. pull and decrypt privately, then measure and check the content
            layout = work / "image"
            decrypt_image(
                DecryptRequest(
                    source=pinned,
                    destination=LayoutRef(layout, "run"),
                    remote=[_AttestedUnwrapper(client, request.node.state_dir)],
                    truncate=False,
                    source_endpoint=request.endpoint,
                ),
                reporter,
            )
            plain, config = _read_layout(layout)
            content = [
                _event(request, repository, digest, i, "blob", layer.digest)
                for i, layer in enumerate(plain)
                if layers[i].is_encrypted
            ]
            with _attester(request, node) as attester:
                _measure(attester, content)
            _compare_or_report(request, node, client, content, references, repository)
            _check_diff_ids(layout, plain, diff_ids, config, repository)
            say(f"measurement: the decrypted layers of {repository} match the reference")

            # 6. attest with every layer measured
            verdict = _attest(request, node, client)

            # 7. authorize the start
            resource = f"image:{repository}"
            answer = client.authorize(START_ACTION, resource)
            if not answer.allowed:
                raise Forbidden(
                    f"authorization: the control plane refuses {START_ACTION} on {resource}: "
                    f"{answer.reason}"
                )
            say(f"authorization: {START_ACTION} on {resource}: {answer.reason}")

            # 8. load and start
            started = _load_and_start(request, layout, plain, config, repository, digest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Started(
        container_id=started[0],
        name=started[1],
        image_id=started[2],
        repository=repository,
        manifest_digest=digest,
        attestation=verdict,
        authorization_log_index=answer.log_index,
    )


# -- the checks ------------------------------------------------------------------------


def _references(client: ControlClient, repository: str, digest: str) -> list[LayerRecord]:
    try:
        entries = client.images(repository)
    except AuthError as exc:
        raise refused("authorization", exc) from None
    for entry in entries:
        if entry.manifest_digest == digest:
            return sorted(entry.layers, key=lambda layer: layer.index)
    raise IntegrityError(
        f"measurement: {repository}@{digest} is not registered with the control plane "
        "(no reference measurements)"
    )


def _event(
    request: RunRequest, repository: str, digest: str, index: int, kind: str, value: str
) -> Event:
    return Event(request.node.pcr, value, repository, digest, index, kind)


@contextmanager
def _attester(request: RunRequest, node: Agent) -> Iterator[Attester]:
    """The node's attester, the TPM held under the node's lock; enrolled, or refused."""
    with node_tpm(request.node.tcti, request.node.state_dir) as tpm:
        if not node.enrolled(tpm):
            raise Forbidden(
                f"attestation: node {request.node.node} has not enrolled this TPM "
                "with the control plane (start trustplane agent first)"
            )
        yield node.attester(tpm)


def _measure(attester: Attester, events: Sequence[Event]) -> None:
    """Extend what the log does not hold yet: the PCR already proves the rest."""
    known = set(attester.log.events)
    for event in events:
        if event not in known:
            attester.record(event)
            known.add(event)


def _compare(events: Sequence[Event], references: Sequence[LayerRecord], repo: str) -> None:
    for event in events:
        reference = references[event.layer]
        want = reference.digest if event.kind == "blob" else reference.diff_id
        if want != event.digest:
            raise IntegrityError(
                f"measurement: layer {event.layer} of {repo} measured {event.kind} "
                f"{event.digest}, the registered reference is {want}"
            )


def _compare_or_report(
    request: RunRequest,
    node: Agent,
    client: ControlClient,
    events: Sequence[Event],
    references: Sequence[LayerRecord],
    repo: str,
) -> None:
    """Compare; on a mismatch, quote first, so the verifier holds the evidence
    (and quarantines the node) before anyone on the node could touch it."""
    try:
        _compare(events, references, repo)
    except IntegrityError:
        with suppress(TrustplaneError), _attester(request, node) as attester:
            attester.attest(client)
        raise


def _attest(request: RunRequest, node: Agent, client: ControlClient) -> str:
    with _attester(request, node) as attester:
        verdict = attester.attest(client)
    if not verdict.passed:
        raise Forbidden(f"attestation: {verdict.reason}")
    return verdict.reason


class _AttestedUnwrapper(KmsUnwrapper):
    """Layer keys from the KMS, to the transport key the TPM certified at
    enrolment. A refusal is an error naming its check, never a cut image."""

    def __init__(self, client: ControlClient, state_dir: Path) -> None:
        super().__init__(
            client,
            (
                (state_dir / "transport.pem").read_bytes(),
                (state_dir / "transport.pub.pem").read_text(),
            ),
        )

    def on_refusal(self, refusal: Forbidden) -> bytes | None:
        check = "attestation" if "attestation required" in str(refusal) else "authorization"
        raise refused(check, refusal) from None


def _read_layout(root: Path) -> tuple[tuple[Descriptor, ...], bytes]:
    layout = Layout(root)
    manifest = parse_manifest(
        layout.read_blob(layout.find("run").digest, MAX_MANIFEST_SIZE), f"{root}: manifest"
    )
    return manifest.layers, layout.read_blob(manifest.config.digest, MAX_CONFIG_SIZE)


def _check_diff_ids(
    root: Path,
    layers: Sequence[Descriptor],
    signed: Sequence[str],
    config: bytes,
    repo: str,
) -> None:
    """Each layer's uncompressed content must hash to the diff_id that was measured."""
    if ImageConfig(config, "decrypted config").diff_ids != list(signed):
        raise IntegrityError(f"measurement: the decrypted config of {repo} has other diff_ids")
    for index, layer in enumerate(layers):
        digest = hashlib.sha256()
        try:
            with blob_path(root, layer.digest).open("rb") as handle:
                stream = decompressed(handle, mediatypes.compression(layer.media_type))
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
        except DECOMPRESSION_ERRORS as exc:
            raise IntegrityError(
                f"measurement: layer {index} of {repo} does not decompress ({exc})"
            ) from None
        if "sha256:" + digest.hexdigest() != signed[index]:
            raise IntegrityError(
                f"measurement: the content of layer {index} of {repo} does not hash to its "
                f"diff_id {signed[index]}"
            )


# -- Docker ------------------------------------------------------------------------------


def _load_and_start(
    request: RunRequest,
    root: Path,
    layers: Sequence[Descriptor],
    config: bytes,
    repository: str,
    digest: str,
) -> tuple[str, str, str]:
    """(container id, name, image id); on failure, nothing of ours stays in Docker."""
    import docker
    import docker.errors

    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    try:
        client = docker.DockerClient(base_url=request.docker_url, timeout=600)
    except docker.errors.DockerException as exc:
        raise UnavailableError(f"Docker engine at {request.docker_url}: {exc}") from None
    try:
        existed = _image_exists(client, image_id)
        tags = [f"{repository}:{request.image.tag}"] if request.image.tag else []
        archive = docker_archive.load_stream(
            config,
            [
                docker_archive.ArchiveLayer(layer.digest, layer.size, _opener(root, layer))
                for layer in layers
            ],
            tags,
        )
        container = None
        try:
            daemon.load(archive, request.docker_url)
            container = client.containers.create(
                image_id,
                list(request.command) or None,
                name=request.name,
                labels={LABEL_IMAGE: repository, LABEL_MANIFEST: digest},
                detach=True,
            )
            container.start()
            container.reload()
            return str(container.id), str(container.name), image_id
        except BaseException as exc:
            if container is not None:
                _quietly(lambda: container.remove(force=True))
            if not existed:
                _quietly(lambda: client.images.remove(image_id, force=True))
            if isinstance(exc, docker.errors.APIError):
                kind = UsageError if exc.status_code in (400, 404, 409) else UnavailableError
                raise kind(f"docker: {exc.explanation or exc}") from None
            if isinstance(exc, docker.errors.DockerException):
                raise UnavailableError(f"docker: {exc}") from None
            raise
    finally:
        client.close()


def _image_exists(client: Any, image_id: str) -> bool:
    import docker.errors

    try:
        client.images.get(image_id)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.DockerException as exc:
        raise UnavailableError(f"Docker engine: {exc}") from None
    return True


def _opener(root: Path, layer: Descriptor) -> docker_archive.Opener:
    path = blob_path(root, layer.digest)

    @contextmanager
    def open_file() -> Iterator[Any]:
        with path.open("rb") as handle:
            yield handle

    return open_file


def _quietly(action: Callable[[], object]) -> None:
    """Clean-up after a failure: the first error is the one to report."""
    with suppress(Exception):
        action()
