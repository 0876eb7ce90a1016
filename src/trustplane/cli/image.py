"""`trustplane image encrypt | decrypt | copy | inspect | sign | verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from trustplane.cli.common import (
    AsJson,
    AuthFile,
    ChunkSize,
    DestCaCert,
    DestCreds,
    DestTlsVerify,
    Platform,
    Quiet,
    SrcCaCert,
    SrcCreds,
    SrcTlsVerify,
    emit_json,
    endpoint,
    load_keys,
    read_file,
    stderr,
    stdout,
)
from trustplane.cli.key import signing_password
from trustplane.cli.log import State, check_log, state_path
from trustplane.cli.session import Ca, Server, connect, url_checker
from trustplane.crypto.signing import is_encrypted_private_key, load_signing_key, load_verify_key
from trustplane.errors import IntegrityError, UsageError
from trustplane.images.copy import CopyRequest, copy_image
from trustplane.images.decrypt import DecryptRequest, decrypt_image
from trustplane.images.encrypt import EncryptRequest
from trustplane.images.inspect import inspect_image
from trustplane.images.kms_unwrap import KmsUnwrapper
from trustplane.images.publish import Registration, publish_image, register_plain_image
from trustplane.images.recipients import parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.images.sign import Signed, check_log_entry, sign_image, verify_image
from trustplane.oci import reference
from trustplane.progress import Reporter

app = typer.Typer(
    help="Encrypt, decrypt, inspect, sign and verify container images.", no_args_is_help=True
)

Source = Annotated[
    str, typer.Argument(help="docker://HOST/REPO:TAG, oci:DIR[:TAG] or docker-daemon:NAME:TAG")
]
Destination = Annotated[str, typer.Argument(help="Same forms as the source.")]
Keys = Annotated[
    list[Path], typer.Option("--key", "-k", help="Private key (PEM) that may unwrap layer keys.")
]
Passphrase = Annotated[
    Path | None, typer.Option(help="File holding the passphrase of encrypted private keys.")
]


@app.command()
def encrypt(
    source: Source,
    destination: Destination,
    recipient: Annotated[
        list[str],
        typer.Option("--recipient", "-r", help="jwe:PUBKEY.pem[:tier=N]; repeat for several."),
    ],
    layers: Annotated[
        list[str] | None,
        typer.Option(help="all (default), indexes like 0,2,-1, or path:GLOB; repeatable."),
    ] = None,
    protect_config: Annotated[
        bool, typer.Option(help="Hide the history of encrypted layers from the public config.")
    ] = False,
    platform: Platform = None,
    authfile: AuthFile = None,
    src_tls_verify: SrcTlsVerify = True,
    src_cacert: SrcCaCert = None,
    src_creds: SrcCreds = None,
    dest_tls_verify: DestTlsVerify = True,
    dest_cacert: DestCaCert = None,
    dest_creds: DestCreds = None,
    dest_chunk_size: ChunkSize = None,
    register: Annotated[
        bool | None,
        typer.Option(
            help="Register the published image with the control plane "
            "(default: when a kms: recipient is used)."
        ),
    ] = None,
    image_name: Annotated[
        str | None,
        typer.Option(
            help="Name to register under (default: HOST/REPO of a docker:// destination)."
        ),
    ] = None,
    server: Server = None,
    ca: Ca = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Encrypt the sensitive layers of an image for the given recipients (ocicrypt format)."""
    uses_kms = any(spec.startswith("kms:") for spec in recipient)
    client = connect(server, ca) if uses_kms or register else None
    target = reference.parse(destination)
    name = image_name or _repository(target)
    if client is not None and (register or (register is None and uses_kms)) and name is None:
        raise UsageError("registering needs --image-name for a destination that is not docker://")

    def kms_key(key_name: str) -> bytes:
        assert client is not None
        return client.recipient(key_name).public_key.encode()

    request = EncryptRequest(
        source=reference.parse(source),
        destination=target,
        recipients=[parse_recipient(spec, kms_key) for spec in recipient],
        selector=LayerSelector.parse(layers or []),
        protect_config=protect_config,
        platform=platform,
        source_endpoint=endpoint(src_tls_verify, src_cacert, src_creds, authfile, side="src-"),
        destination_endpoint=endpoint(
            dest_tls_verify, dest_cacert, dest_creds, authfile, dest_chunk_size, side="dest-"
        ),
    )
    registering = register or (register is None and uses_kms)
    registration = (
        Registration(client, name) if client is not None and name and registering else None
    )
    with Reporter(enabled=not quiet) as reporter:
        try:
            published = publish_image(request, registration, reporter)
        finally:
            if client is not None:
                client.close()
    result, log_index = published.encrypted, published.log_index
    if log_index is not None:
        stderr.print(f"registered {name} with the control plane (log entry {log_index})")
    if as_json:
        emit_json(
            {
                "registeredLogIndex": log_index,
                "manifestDigest": result.manifest_digest,
                "encryptedLayers": list(result.encrypted_layers),
                "layerCount": result.layer_count,
                "convertedFromDocker": result.converted_from_docker,
            }
        )
        return
    if result.converted_from_docker:
        stderr.print(
            "converted the Docker schema-2 image to OCI (encrypted layers exist only in OCI)"
        )
    stdout.print(
        f"encrypted layers {list(result.encrypted_layers)} of {result.layer_count} "
        f"into {destination} ({result.manifest_digest})"
    )


@app.command()
def register(
    source: Source,
    image_name: Annotated[
        str | None,
        typer.Option(help="Name to register under (default: HOST/REPO of a docker:// source)."),
    ] = None,
    platform: Platform = None,
    authfile: AuthFile = None,
    src_tls_verify: SrcTlsVerify = True,
    src_cacert: SrcCaCert = None,
    src_creds: SrcCreds = None,
    server: Server = None,
    ca: Ca = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Register a plain image's layer and file digests (runtime integrity reference)."""
    ref = reference.parse(source)
    name = image_name or _repository(ref)
    if name is None:
        raise UsageError("registering needs --image-name for a source that is not docker://")
    source_endpoint = endpoint(src_tls_verify, src_cacert, src_creds, authfile, side="src-")
    client = connect(server, ca)
    with client, Reporter(enabled=not quiet) as reporter:
        registered = register_plain_image(
            ref, Registration(client, name), source_endpoint, platform, reporter
        )
    plain, log_index = registered.reference, registered.log_index
    files = sum(len(layer.files or ()) for layer in plain.layers)
    if as_json:
        emit_json(
            {
                "registeredLogIndex": log_index,
                "manifestDigest": plain.manifest_digest,
                "layerCount": len(plain.layers),
                "fileCount": files,
            }
        )
        return
    stdout.print(
        f"registered {name}@{plain.manifest_digest}: {len(plain.layers)} layers, "
        f"{files} file digests (log entry {log_index})"
    )


@app.command()
def decrypt(
    source: Source,
    destination: Destination,
    key: Annotated[
        list[Path] | None,
        typer.Option("--key", "-k", help="Private key (PEM) that may unwrap layer keys."),
    ] = None,
    kms: Annotated[
        str | None,
        typer.Option(
            help="Control plane URL whose KMS unwraps layer keys for us (after login).",
            callback=url_checker("--kms"),
        ),
    ] = None,
    ca: Ca = None,
    key_passphrase_file: Passphrase = None,
    truncate: Annotated[
        bool,
        typer.Option(
            help="With keys of a lower tier, give the image cut below the first layer they "
            "cannot open (--no-truncate: fail instead)."
        ),
    ] = True,
    platform: Platform = None,
    authfile: AuthFile = None,
    src_tls_verify: SrcTlsVerify = True,
    src_cacert: SrcCaCert = None,
    src_creds: SrcCreds = None,
    dest_tls_verify: DestTlsVerify = True,
    dest_cacert: DestCaCert = None,
    dest_creds: DestCreds = None,
    dest_chunk_size: ChunkSize = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Decrypt an image; every layer is verified before any byte is written."""
    remote = [KmsUnwrapper(connect(kms, ca))] if kms else []
    request = DecryptRequest(
        source=reference.parse(source),
        destination=reference.parse(destination),
        keys=load_keys(key or [], key_passphrase_file),
        remote=remote,
        truncate=truncate,
        platform=platform,
        source_endpoint=endpoint(src_tls_verify, src_cacert, src_creds, authfile, side="src-"),
        destination_endpoint=endpoint(
            dest_tls_verify, dest_cacert, dest_creds, authfile, dest_chunk_size, side="dest-"
        ),
    )
    with Reporter(enabled=not quiet) as reporter:
        result = decrypt_image(request, reporter)
    if as_json:
        emit_json(
            {
                "manifestDigest": result.manifest_digest,
                "layerCount": result.layer_count,
                "sourceLayerCount": result.source_layer_count,
                "decryptedLayers": list(result.decrypted_layers),
                "restoredConfig": result.restored_config,
            }
        )
        return
    if result.layer_count < result.source_layer_count:
        opened = (
            f"encrypted layers {list(result.decrypted_layers)}"
            if result.decrypted_layers
            else "the protected config only"
        )
        stderr.print(
            f"the keys open {opened}, not layer {result.layer_count}: the image is cut to "
            f"its first {result.layer_count} of {result.source_layer_count} layers"
        )
    stdout.print(
        f"decrypted layers {list(result.decrypted_layers)} into {destination} "
        f"({result.layer_count} layers, {result.manifest_digest})"
    )


@app.command()
def copy(
    source: Source,
    destination: Destination,
    platform: Platform = None,
    authfile: AuthFile = None,
    src_tls_verify: SrcTlsVerify = True,
    src_cacert: SrcCaCert = None,
    src_creds: SrcCreds = None,
    dest_tls_verify: DestTlsVerify = True,
    dest_cacert: DestCaCert = None,
    dest_creds: DestCreds = None,
    dest_chunk_size: ChunkSize = None,
    quiet: Quiet = False,
) -> None:
    """Copy an image as it is, encrypted or not, verifying every blob (no keys needed)."""
    request = CopyRequest(
        source=reference.parse(source),
        destination=reference.parse(destination),
        platform=platform,
        source_endpoint=endpoint(src_tls_verify, src_cacert, src_creds, authfile, side="src-"),
        destination_endpoint=endpoint(
            dest_tls_verify, dest_cacert, dest_creds, authfile, dest_chunk_size, side="dest-"
        ),
    )
    with Reporter(enabled=not quiet) as reporter:
        digest = copy_image(request, reporter)
    stdout.print(f"copied {source} to {destination} ({digest})")


@app.command()
def inspect(
    ref: Annotated[str, typer.Argument(help="The image to describe.")],
    key: Annotated[
        list[Path] | None, typer.Option("--key", "-k", help="Also say which layers this key opens.")
    ] = None,
    key_passphrase_file: Passphrase = None,
    authfile: AuthFile = None,
    tls_verify: Annotated[bool, typer.Option("--tls-verify/--no-tls-verify")] = True,
    cacert: SrcCaCert = None,
    creds: SrcCreds = None,
    as_json: AsJson = False,
) -> None:
    """Layers, media types, sizes, and which layers are encrypted for whom."""
    info = inspect_image(
        reference.parse(ref),
        endpoint(tls_verify, cacert, creds, authfile),
        load_keys(key or [], key_passphrase_file),
    )
    if as_json:
        emit_json(info)
        return
    _print_inspection(info)


@app.command()
def sign(
    ref: Annotated[str, typer.Argument(help="docker://HOST/REPO:TAG or @DIGEST to sign.")],
    key: Annotated[
        Path,
        typer.Option(
            "--key",
            "-k",
            help="Signing key: cosign's encrypted format (password from $COSIGN_PASSWORD "
            "or a prompt) or a PEM private key.",
        ),
    ],
    annotation: Annotated[
        list[str] | None,
        typer.Option("--annotation", "-a", help="KEY=VALUE for the payload's optional part."),
    ] = None,
    log: Annotated[
        bool | None,
        typer.Option(
            "--log/--no-log",
            help="Record the signature in the control plane's transparency log "
            "(default: when --server is given).",
        ),
    ] = None,
    server: Server = None,
    ca: Ca = None,
    authfile: AuthFile = None,
    tls_verify: Annotated[bool, typer.Option("--tls-verify/--no-tls-verify")] = True,
    cacert: SrcCaCert = None,
    creds: SrcCreds = None,
    as_json: AsJson = False,
) -> None:
    """Sign an image in cosign's format (the sha256-<digest>.sig tag next to it)."""
    key_data = read_file(key, "--key")
    password = signing_password() if is_encrypted_private_key(key_data) else None
    signing_key = load_signing_key(key_data, str(key), password)
    optional = _annotations(annotation or [])
    target = reference.parse(ref)
    client = connect(server, ca) if log or (log is None and server) else None

    def record(signed: Signed) -> int:
        assert client is not None
        with client:
            answer = client.record_signature(
                _repository(target) or str(target),
                signed.manifest_digest,
                signed.payload,
                signed.signature,
                signing_key.public.public_pem(),
            )
        return answer.log_index

    result = sign_image(
        target,
        signing_key,
        endpoint(tls_verify, cacert, creds, authfile),
        optional,
        record if client is not None else None,
    )
    signed = result.signed
    if as_json:
        emit_json(
            {
                "manifestDigest": signed.manifest_digest,
                "signatureTag": result.signature_tag,
                "payloadDigest": signed.payload_digest,
                "keyID": signed.key_id,
                "logIndex": signed.log_index,
                "signatures": result.signatures,
                "appended": result.appended,
            }
        )
        return
    where = f", log entry {signed.log_index}" if signed.log_index is not None else ""
    verb = "signed" if result.appended else "already signed with this key and payload:"
    stdout.print(f"{verb} {ref} ({signed.manifest_digest}) in {result.signature_tag}{where}")


@app.command()
def verify(
    ref: Annotated[str, typer.Argument(help="docker://HOST/REPO:TAG or @DIGEST to verify.")],
    key: Annotated[
        Path, typer.Option("--key", "-k", help="The signer's public key (PEM, as cosign.pub).")
    ],
    require_log: Annotated[
        bool,
        typer.Option(
            help="Also prove that the signature is in the control plane's transparency log "
            "(signed checkpoint, inclusion proof)."
        ),
    ] = False,
    log_key: Annotated[
        str | None, typer.Option(help="The log's verifier key (default: pinned on first use).")
    ] = None,
    state: State = None,
    server: Server = None,
    ca: Ca = None,
    authfile: AuthFile = None,
    tls_verify: Annotated[bool, typer.Option("--tls-verify/--no-tls-verify")] = True,
    cacert: SrcCaCert = None,
    creds: SrcCreds = None,
    as_json: AsJson = False,
) -> None:
    """Check an image's cosign signatures with a public key (exit 5 when none is valid)."""
    verify_key = load_verify_key(read_file(key, "--key"), str(key))
    result = verify_image(
        reference.parse(ref), verify_key, endpoint(tls_verify, cacert, creds, authfile)
    )
    proven: list[int] = []
    if require_log:
        logged = [signed for signed in result.verified if signed.log_index is not None]
        if not logged:
            raise IntegrityError(
                f"{ref}: no valid signature by {key} names a transparency log entry"
            )
        with connect(server, ca) as client:
            _, bodies = check_log(
                client, state_path(state), log_key, [int(s.log_index or 0) for s in logged]
            )
        for signed in logged:
            check_log_entry(bodies[int(signed.log_index or 0)], signed)
            proven.append(int(signed.log_index or 0))
    if as_json:
        emit_json(
            {
                "manifestDigest": result.manifest_digest,
                "keyID": verify_key.key_id,
                "signatures": [
                    {
                        "payloadDigest": signed.payload_digest,
                        "dockerReference": signed.docker_reference,
                        "optional": signed.optional,
                        "logIndex": signed.log_index,
                    }
                    for signed in result.verified
                ],
                "logIncluded": proven,
            }
        )
        return
    logged_text = f", in the transparency log at {proven}" if proven else ""
    stdout.print(
        f"verified {ref} ({result.manifest_digest}): {len(result.verified)} valid "
        f"signature(s) by {key}{logged_text}"
    )


def _annotations(pairs: list[str]) -> dict[str, Any] | None:
    result: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--annotation {pair!r}: give KEY=VALUE")
        result[name] = value
    return result or None


def _repository(ref: reference.ImageRef) -> str | None:
    """The canonical name of a registry image (what the control plane stores it under)."""
    if isinstance(ref, reference.RegistryRef):
        return ref.name
    return None


def _print_inspection(info: dict[str, Any]) -> None:
    stdout.print(f"[bold]{info['reference']}[/bold]")
    stdout.print(f"  manifest {info['manifestDigest']}")
    config = info["config"]
    protection = "history of encrypted layers hidden" if config["protected"] else "public"
    stdout.print(f"  config   {config['digest']} ({config['size']:,} B, {protection})")
    for layer in info["layers"]:
        kind = layer["mediaType"].rsplit("/", 1)[-1].removeprefix("vnd.oci.image.layer.v1.")
        kind = kind.removeprefix("vnd.docker.image.rootfs.")
        state = "[yellow]encrypted[/yellow]" if layer["encrypted"] else "plain"
        stdout.print(
            f"  layer {layer['index']}  {kind:<20} {layer['size']:>14,} B  "
            f"{layer['digest'][:19]}  {state}"
        )
        for recipient in layer.get("recipients", []):
            algorithm = recipient["alg"] + (f" {recipient['curve']}" if recipient["curve"] else "")
            stdout.print(f"      for {algorithm:<20} {recipient['keyID'] or '(no key id)'}")
        if "opensWithGivenKeys" in layer:
            verdict = (
                "[green]opens[/green]" if layer["opensWithGivenKeys"] else "[red]stays locked[/red]"
            )
            stdout.print(f"      with the given keys: {verdict}")
