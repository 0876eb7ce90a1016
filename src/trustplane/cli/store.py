"""`trustplane store import | ls | inspect | mount | run | rm | recover`: the layer store.

Every stored layer is encrypted under a key of its own; the keys are held by
the control plane (one chain per image) and asked for per use: `--tier N`
asks for the key of layer N, which opens layers 0..N and nothing above.
With `--node NAME` (and the node options of `trustplane agent`) the command
acts as that attested node: layers are measured into its TPM and keys come
wrapped to its certified transport key. Otherwise it acts as the logged-in
user (`trustplane login`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from trustplane.cli.common import (
    AsJson,
    AuthFile,
    Platform,
    Quiet,
    SrcCaCert,
    SrcCreds,
    SrcTlsVerify,
    emit_json,
    endpoint,
    load_keys,
    stderr,
    stdout,
)
from trustplane.cli.node_options import (
    DEFAULT_NODE_KEY,
    DEFAULT_PCR,
    DEFAULT_STATE_DIR,
    DEFAULT_TPM,
    Pcr,
    check_node_key,
    check_state_dir,
    check_tcti,
)
from trustplane.cli.session import Ca, Server, connect
from trustplane.client import ControlClient
from trustplane.errors import UnavailableError, UsageError
from trustplane.images.decrypt import Unwrapper
from trustplane.images.kms_unwrap import KmsUnwrapper
from trustplane.layerstore import ControlPlaneKeys, ImportRequest, LayerStore, Measurer
from trustplane.layerstore.choice import BackendConfig
from trustplane.layerstore.importer import DEFAULT_SIZE
from trustplane.layerstore.records import StoredImage
from trustplane.layerstore.snapshotter import SPARES, VIEW_IDLE, Snapshotter
from trustplane.layerstore.store import DEFAULT_ROOT
from trustplane.oci import reference
from trustplane.progress import Reporter

DEFAULT_SNAPSHOTTER_ROOT = Path("/var/lib/trustplane/snapshotter")
DEFAULT_SOCKET = Path("/run/trustplane/snapshotter.sock")

app = typer.Typer(
    help="Images stored layer by layer, each layer encrypted under its own key.",
    no_args_is_help=True,
)

StoreDir = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help=f"The store's directory (default $TRUSTPLANE_STORE or {DEFAULT_ROOT}).",
        show_default=False,
    ),
]
ImageArg = Annotated[str, typer.Argument(help="Stored image: its name, id or id prefix.")]
Tier = Annotated[
    str | None,
    typer.Option(help="Layers 0..N (a number or a tier named at import; default: all)."),
]
Node = Annotated[
    str | None,
    typer.Option("--node", help="Act as this attested node (measure into its TPM, its keys)."),
]
# The node options of `trustplane agent`, checked only when --node says the
# command acts as a node (a user's command has no node key to check).
NodeKey = Annotated[
    Path, typer.Option("--node-key", help="With --node: its private key (PEM) for its token.")
]
TpmTcti = Annotated[str, typer.Option("--tpm", help="With --node: the TCTI of its TPM.")]
StateDir = Annotated[
    Path, typer.Option("--state-dir", help="With --node: the agent's state directory.")
]
_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


Backend = Annotated[
    str | None,
    typer.Option(
        "--backend",
        help="Layer backend of a new store: auto (device-mapper when the host has it and "
        "--pool is given), qcow2 or dm (default $TRUSTPLANE_STORE_BACKEND or auto). "
        "A store keeps the backend it was made with.",
        show_default=False,
    ),
]
Pool = Annotated[
    str | None,
    typer.Option(
        "--pool",
        help="Block device for the dm backend's thin pool, whose first MiB must be zeros "
        "(default $TRUSTPLANE_STORE_POOL); needed the first time only.",
        show_default=False,
    ),
]


def _store(path: Path | None, backend: str | None = None, pool: str | None = None) -> LayerStore:
    root = path or Path(os.environ.get("TRUSTPLANE_STORE") or DEFAULT_ROOT)
    config = BackendConfig(
        kind=backend or os.environ.get("TRUSTPLANE_STORE_BACKEND") or "auto",
        pool=pool or os.environ.get("TRUSTPLANE_STORE_POOL") or None,
    )
    return LayerStore(root, config=config)


@dataclass
class _Caller:
    client: ControlClient
    keys: ControlPlaneKeys
    unwrapper: Unwrapper
    measurer: Measurer | None


@contextlib.contextmanager
def _caller(
    server: str | None,
    ca: Path | None,
    node: str | None,
    node_key: Path,
    tpm: str,
    state_dir: Path,
    pcr: int,
) -> Iterator[_Caller]:
    """The logged-in user, or (with --node) the attested node."""
    if node is None:
        with connect(server, ca) as client:
            yield _Caller(client, ControlPlaneKeys(client), KmsUnwrapper(client), None)
        return
    if server is None:
        raise UsageError("--node needs --server (the control plane the node enrolled with)")
    check_node_key(node_key)
    check_tcti(tpm)
    check_state_dir(state_dir)
    # Imported here: the node side loads the TPM libraries, which users need not.
    from trustplane.agent.layer_store import NodeMeasurer, node_keys
    from trustplane.agent.service import Agent, AgentConfig

    agent = Agent(
        AgentConfig(
            server_url=server,
            tcti=tpm,
            node=node,
            node_key=node_key,
            state_dir=state_dir,
            ca_file=ca,
            pcr=pcr,
        )
    )
    with agent.client() as client:
        keys, unwrapper = node_keys(agent, client)
        yield _Caller(client, keys, unwrapper, NodeMeasurer(agent, client))


@app.command(name="import")
def import_(
    source: Annotated[
        str, typer.Argument(help="docker://HOST/REPO:TAG, oci:DIR[:TAG] or docker-daemon:NAME:TAG")
    ],
    repository: Annotated[
        str | None,
        typer.Option(help="HOST/REPO the policy knows the image by (default: from the source)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name in the store (default REPO:TAG).")] = None,
    tiers: Annotated[
        list[str] | None,
        typer.Option(help="Named views: NAME=N[,NAME=N] (NAME sees layers 0..N); repeatable."),
    ] = None,
    key: Annotated[
        list[Path] | None,
        typer.Option("--key", "-k", help="Private key (PEM) that may unwrap layer keys."),
    ] = None,
    key_passphrase_file: Annotated[
        Path | None, typer.Option(help="File holding the passphrase of encrypted private keys.")
    ] = None,
    kms: Annotated[
        bool, typer.Option("--kms", help="Have the control plane's KMS unwrap layer keys.")
    ] = False,
    size: Annotated[
        str, typer.Option(help="Virtual size of each layer (sparse), e.g. 16G.")
    ] = f"{DEFAULT_SIZE >> 30}G",
    platform: Platform = None,
    authfile: AuthFile = None,
    src_tls_verify: SrcTlsVerify = True,
    src_cacert: SrcCaCert = None,
    src_creds: SrcCreds = None,
    store: StoreDir = None,
    backend: Backend = None,
    pool: Pool = None,
    server: Server = None,
    ca: Ca = None,
    node: Node = None,
    node_key: NodeKey = DEFAULT_NODE_KEY,
    tpm: TpmTcti = DEFAULT_TPM,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    pcr: Pcr = DEFAULT_PCR,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Store an image, each layer decrypted straight into its own encrypted snapshot."""
    layer_store = _store(store, backend, pool)
    with _caller(server, ca, node, node_key, tpm, state_dir, pcr) as caller:
        request = ImportRequest(
            source=reference.parse(source),
            endpoint=endpoint(src_tls_verify, src_cacert, src_creds, authfile),
            repository=repository,
            name=name,
            tiers=_tiers(tiers or []),
            keys=load_keys(key or [], key_passphrase_file),
            remote=[caller.unwrapper] if kms or node else [],
            platform=platform,
            size=_size(size),
        )
        with Reporter(enabled=not quiet) as reporter:
            image = layer_store.import_image(request, caller.keys, reporter, caller.measurer)
    if as_json:
        emit_json(image.summary())
        return
    if len(image.layers) < image.source_layers:
        stderr.print(
            f"the keys open layers 0..{image.top} only: stored {len(image.layers)} of "
            f"{image.source_layers} layers"
        )
    stdout.print(f"stored {image.name} ({image.id}): {_describe(image)}")


@app.command(name="ls")
def list_images(store: StoreDir = None, as_json: AsJson = False) -> None:
    """The stored images."""
    images = _store(store).images()
    if as_json:
        emit_json([image.summary() for image in images])
        return
    for image in images:
        stdout.print(f"{image.id}  {image.name}  {_describe(image)}")


@app.command()
def inspect(image: ImageArg, store: StoreDir = None, as_json: AsJson = False) -> None:
    """What the store holds of an image (no key is needed: nothing secret is shown)."""
    stored = _store(store).find(image)
    details: dict[str, Any] = {
        **stored.summary(),
        "source": stored.source,
        "chain": {"server": stored.chain_server, "id": stored.chain_id},
        "size": stored.size,
        "layerDetails": [
            {
                "index": layer.index,
                "digest": layer.digest,
                "diffID": layer.diff_id,
                "mediaType": layer.media_type,
                "encryptedInSource": layer.encrypted_in_source,
                "diskBytes": layer.disk_bytes,
            }
            for layer in stored.layers
        ],
    }
    if as_json:
        emit_json(details)
        return
    stdout.print(f"{stored.name} ({stored.id}), from {stored.source}, {stored.backend} backend")
    stdout.print(f"  keys: chain {stored.chain_id} at {stored.chain_server}")
    for layer in stored.layers:
        stdout.print(
            f"  layer {layer.index}: {layer.diff_id}  {_mib(layer.disk_bytes)} on disk"
            + ("  (encrypted in the source)" if layer.encrypted_in_source else "")
        )


@app.command()
def mount(
    image: ImageArg,
    directory: Annotated[Path, typer.Argument(help="Where to mount the view (read-only).")],
    tier: Tier = None,
    store: StoreDir = None,
    server: Server = None,
    ca: Ca = None,
    node: Node = None,
    node_key: NodeKey = DEFAULT_NODE_KEY,
    tpm: TpmTcti = DEFAULT_TPM,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    pcr: Pcr = DEFAULT_PCR,
    as_json: AsJson = False,
) -> None:
    """Mount layers 0..N read-only at DIRECTORY until interrupted (Ctrl-C or SIGTERM)."""
    layer_store = _store(store)
    stored = layer_store.find(image)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    with (
        _caller(server, ca, node, node_key, tpm, state_dir, pcr) as caller,
        layer_store.view(
            stored, tier, caller.keys, measurer=caller.measurer, target=directory
        ) as view,
    ):
        if as_json:  # one line: whoever started us reads it as the sign that the view is up
            ready = {"image": stored.name, "tier": view.tier, "mountpoint": str(view.root)}
            sys.stdout.write(json.dumps(ready) + "\n")
        else:
            stdout.print(
                f"{stored.name} layers 0..{view.tier} mounted read-only at {view.root}; "
                "interrupt (Ctrl-C, SIGTERM) to unmount"
            )
        sys.stdout.flush()
        _wait_for_a_signal()


@app.command()
def run(
    image: ImageArg,
    command: Annotated[
        list[str] | None, typer.Argument(help="Command (after --; default: the image's).")
    ] = None,
    tier: Tier = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the container.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before the container is killed.")] = (
        24 * 3600.0
    ),
    store: StoreDir = None,
    server: Server = None,
    ca: Ca = None,
    node: Node = None,
    node_key: NodeKey = DEFAULT_NODE_KEY,
    tpm: TpmTcti = DEFAULT_TPM,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    pcr: Pcr = DEFAULT_PCR,
) -> None:
    """Run a container from layers 0..N; its writes are encrypted and discarded with it.

    Its output is printed when it exits; the exit status is the container's.
    """
    layer_store = _store(store)
    stored = layer_store.find(image)
    for variable in env or []:
        if "=" not in variable:
            raise UsageError(f"--env {variable!r}: expected KEY=VALUE")
    with _caller(server, ca, node, node_key, tpm, state_dir, pcr) as caller:
        result = layer_store.run(
            stored,
            tier,
            command or [],
            caller.keys,
            measurer=caller.measurer,
            env=env or [],
            timeout=timeout,
        )
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command()
def rm(
    image: ImageArg,
    store: StoreDir = None,
    server: Server = None,
    ca: Ca = None,
    as_json: AsJson = False,
) -> None:
    """Destroy the image's layer keys (crypto-shredding), then its files."""
    layer_store = _store(store)
    stored = layer_store.find(image)
    with connect(server, ca) as client:
        layer_store.remove(stored, ControlPlaneKeys(client))
    if as_json:
        emit_json({"removed": stored.id, "name": stored.name, "chain": stored.chain_id})
        return
    stdout.print(
        f"removed {stored.name} ({stored.id}): key chain {stored.chain_id} destroyed, "
        f"{len(stored.layers)} layer files deleted"
    )


@app.command()
def recover(
    store: StoreDir = None,
    server: Server = None,
    ca: Ca = None,
    as_json: AsJson = False,
) -> None:
    """Undo what crashed store commands left, destroying the key chains of broken imports."""
    layer_store = _store(store)
    done = list(layer_store.recovered)
    with connect(server, ca) as client:
        done += layer_store.recover(ControlPlaneKeys(client))
    if as_json:
        emit_json(done)
        return
    for line in done or ["nothing to recover"]:
        stdout.print(line)


def snapshotter(
    socket: Annotated[
        Path,
        typer.Option(help="Unix socket to serve (containerd's proxy_plugins address)."),
    ] = DEFAULT_SOCKET,
    root: Annotated[
        Path | None,
        typer.Option(
            help=f"The snapshotter's directory (default $TRUSTPLANE_SNAPSHOTTER or "
            f"{DEFAULT_SNAPSHOTTER_ROOT}).",
            show_default=False,
        ),
    ] = None,
    repository: Annotated[
        str | None,
        typer.Option(
            help="What the policy calls this host's containerd layers: key.release on "
            "image:REPOSITORY (default containerd/HOSTNAME).",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        str, typer.Option(help="Virtual size of each layer (sparse), e.g. 16G.")
    ] = f"{DEFAULT_SIZE >> 30}G",
    spares: Annotated[
        int, typer.Option(min=0, max=16, help="Encrypted scratch volumes kept made ahead.")
    ] = SPARES,
    view_idle: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds an image's layers stay open after its last container (0: none).",
        ),
    ] = VIEW_IDLE,
    server: Server = None,
    ca: Ca = None,
    node: Node = None,
    node_key: NodeKey = DEFAULT_NODE_KEY,
    tpm: TpmTcti = DEFAULT_TPM,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    pcr: Pcr = DEFAULT_PCR,
) -> None:
    """Serve containerd's snapshots API: layers it unpacks are stored encrypted, each
    under its own key, and containers run from them (ctr --snapshotter NAME).

    Runs until interrupted (Ctrl-C, SIGTERM). Keys come from the control plane
    as the logged-in user, or (with --node) as that attested node.
    """
    # Imported here: the generated gRPC stubs load only for this command.
    try:
        from trustplane.layerstore.snapshot_service import serve
    except ImportError as exc:
        raise UnavailableError(
            f"containerd's snapshots API is not compiled ({exc}); run scripts/run setup"
        ) from None

    directory = root or Path(os.environ.get("TRUSTPLANE_SNAPSHOTTER") or DEFAULT_SNAPSHOTTER_ROOT)
    layer_size = _size(size)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per key request is noise
    with _caller(server, ca, node, node_key, tpm, state_dir, pcr) as caller:
        snapshots = Snapshotter(
            directory,
            caller.keys,
            repository=repository,
            layer_size=layer_size,
            spares=spares,
            view_idle=view_idle,
        )
        try:
            for line in snapshots.recovered:
                stderr.print(f"recovered: {line}")
            grpc_server = serve(snapshots, socket)
            stderr.print(
                f"serving containerd's snapshots API on {socket} (root {directory}, "
                f"keys: image:{snapshots.repository} at {caller.client.url})"
            )
            try:
                _wait_for_a_signal()
            finally:
                grpc_server.stop(grace=5).wait()
        finally:
            snapshots.close()


def _wait_for_a_signal() -> None:
    """Block until SIGINT or SIGTERM; either ends the command normally (exit 0)."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not stop.wait(3600):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _tiers(specs: list[str]) -> dict[str, int]:
    tiers: dict[str, int] = {}
    for spec in specs:
        for part in filter(None, spec.split(",")):
            name, sep, value = part.partition("=")
            if not sep or not name or not value.isdigit() or name.isdigit():
                raise UsageError(f"--tiers {part!r}: expected NAME=N (N a layer index)")
            tiers[name] = int(value)
    return tiers


def _size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise UsageError(f"--size {text!r}: expected a size like 512M or 16G")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2).upper()]
    return int(match.group(1)) << shift


def _describe(image: StoredImage) -> str:
    tiers = ", ".join(f"{name}=0..{tier}" for name, tier in sorted(image.tiers.items()))
    disk = sum(layer.disk_bytes for layer in image.layers)
    return f"{len(image.layers)} layers, {_mib(disk)} on disk" + (
        f", tiers {tiers}" if tiers else ""
    )


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"
