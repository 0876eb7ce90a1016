"""`trustplane volume …`: encrypted volumes from the block-storage service, attached on a host.

`create|list|show|delete|verify|extend|rotate-key|reencrypt|clone|snapshot|encrypt`
and `type create|list` talk to the control plane.
`attach|detach` run on the VM's host (the compute side): the volume's key
comes from the control plane (`volume.attach` in the policy, logged), goes
into an ephemeral private libvirt secret from bytes, and QEMU decrypts. The
key never appears in argv, the environment, a log or a file.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from trustplane.api.volume_spec import ControlLocation, EncryptionSpec, Provider, parse_size
from trustplane.api.volumes import VolumeInfo, VolumeOperationInfo
from trustplane.cli.common import AsJson, emit_json, read_file, stdout
from trustplane.cli.node_options import DEFAULT_STATE_DIR, TransportStateDir, check_node_key
from trustplane.cli.session import Ca, Server, connect, load
from trustplane.client import ControlClient
from trustplane.errors import IntegrityError, MalformedError, TrustplaneError, UsageError
from trustplane.progress import Reporter

app = typer.Typer(help="Encrypted volumes (the block-storage service).", no_args_is_help=True)
type_app = typer.Typer(help="Volume types: a backend and its encryption.", no_args_is_help=True)
app.add_typer(type_app, name="type")

Name = Annotated[str, typer.Argument(metavar="NAME", help="The volume's name.")]
Domain = Annotated[str, typer.Option("--domain", help="The libvirt domain (VM) on this host.")]
Libvirt = Annotated[
    str, typer.Option("--libvirt", help="libvirt connection URI of this host's hypervisor.")
]
NodeOption = Annotated[
    str | None,
    typer.Option(
        "--node", help="Act as this registered node (its key signs the login); default: the login."
    ),
]
NodeKeyOption = Annotated[
    Path | None,
    typer.Option("--node-key", help="The node's private key (PEM).", callback=check_node_key),
]
CephKeyFile = Annotated[
    Path | None,
    typer.Option(
        "--ceph-key-file",
        help="RBD volumes: this host's cephx key (base64, as `ceph auth get-key` prints it).",
    ),
]
DEFAULT_LIBVIRT = "qemu:///system"


@type_app.command("create")
def create_type(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The type's name.")],
    backend: Annotated[str, typer.Option("--backend", help="A backend configured on the server.")],
    provider: Annotated[
        Provider | None, typer.Option(help="LUKS version: luks (LUKS1) or luks2.")
    ] = None,
    control_location: Annotated[
        ControlLocation | None,
        typer.Option(help="front-end (QEMU or the host decrypts) or back-end (librbd)."),
    ] = None,
    key_size: Annotated[
        int | None, typer.Option(help="Bits of the LUKS master key: 512 is AES-256-XTS.")
    ] = None,
    as_json: AsJson = False,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Create a volume type (administrators): a backend and its encryption spec.

    Without --provider, --control-location or --key-size the type gets the
    backend's default encryption (its faster path: librbd LUKS2 on RBD, LUKS1
    elsewhere)."""
    encryption = None
    given = {"provider": provider, "control_location": control_location, "key_size": key_size}
    chosen = {k: v for k, v in given.items() if v is not None}
    if chosen:
        try:
            encryption = EncryptionSpec.model_validate(chosen)
        except ValueError:
            raise UsageError("--key-size is 256 or 512") from None
    with connect(server, ca) as client:
        created = client.create_volume_type(name, backend, encryption)
    if as_json:
        emit_json(created)
        return
    spec = created.encryption
    stdout.print(
        f"volume type {created.name}: {created.backend_kind} backend {created.backend}, "
        f"{spec.provider} {spec.cipher} {spec.key_size}-bit, {spec.control_location} "
        f"({created.engine})"
    )


@type_app.command("list")
def list_types(as_json: AsJson = False, server: Server = None, ca: Ca = None) -> None:
    """The volume types."""
    with connect(server, ca) as client:
        types = client.volume_types()
    if as_json:
        emit_json([t.model_dump(mode="json") for t in types])
        return
    table = Table("TYPE", "BACKEND", "KIND", "PROVIDER", "CONTROL", "ENGINE", box=None)
    for t in types:
        e = t.encryption
        table.add_row(t.name, t.backend, t.backend_kind, e.provider, e.control_location, t.engine)
    stdout.print(table)


@app.command("create")
def create(
    name: Name,
    size: Annotated[str, typer.Option("--size", help="Usable size: 512M, 10G, …")],
    volume_type: Annotated[str, typer.Option("--type", help="The volume type.")],
    as_json: AsJson = False,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Create an encrypted volume; the KMS generates its key, the service keeps only its UUID."""
    size_bytes = parse_size(size)
    with connect(server, ca) as client:
        created = client.create_volume(name, size_bytes, volume_type)
    if as_json:
        emit_json(created)
        return
    stdout.print(f"volume {created.name}: {_size(created.size)}, key {created.key_id}")


@app.command("list")
def list_volumes(as_json: AsJson = False, server: Server = None, ca: Ca = None) -> None:
    """The volumes you own or may attach (administrators: all)."""
    with connect(server, ca) as client:
        volumes = client.volumes()
    if as_json:
        emit_json([v.model_dump(mode="json") for v in volumes])
        return
    table = Table("NAME", "SIZE", "TYPE", "STATE", "ATTACHED TO", box=None)
    for v in volumes:
        where = f"{v.attachment.domain} ({v.attachment.subject})" if v.attachment else "-"
        table.add_row(v.name, _size(v.size), v.volume_type, v.state, where)
    stdout.print(table)


@app.command("show")
def show(name: Name, as_json: AsJson = False, server: Server = None, ca: Ca = None) -> None:
    """One volume: where it is, its key's UUID, its LUKS header, its attachment."""
    with connect(server, ca) as client:
        volume = client.volume(name)
    if as_json:
        emit_json(volume)
        return
    _print_volume(volume)


@app.command("delete")
def delete(name: Name, server: Server = None, ca: Ca = None) -> None:
    """Delete a volume: its key is destroyed first (crypto-shredding), then its storage."""
    with connect(server, ca) as client:
        client.delete_volume(name)
    stdout.print(f"deleted volume {name} (key destroyed, storage removed)")


@app.command("verify")
def verify(
    name: Name,
    samples: Annotated[
        int | None,
        typer.Option("--samples", min=1, help="Payload samples of 4 KiB to test (default 32)."),
    ] = None,
    as_json: AsJson = False,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Prove a volume is encrypted: the server reads its raw storage and checks it.

    The LUKS header is there, its UUID and digest are the recorded ones, the
    cipher is the type's, and sampled payload sectors are not plaintext-like
    (byte entropy). Exits with the integrity error's code when a check fails
    (the JSON is printed first with --json)."""
    with connect(server, ca) as client:
        report = client.verify_volume(name, samples)
    if as_json:
        emit_json(report)
    else:
        table = Table("CHECK", "RESULT", "DETAIL", box=None)
        for check in report.checks:
            table.add_row(check.name, "ok" if check.passed else "FAILED", check.detail)
        stdout.print(f"volume {report.volume} at {report.location}")
        stdout.print(table)
    if not report.passed:
        failed = ", ".join(c.name for c in report.checks if not c.passed)
        raise IntegrityError(f"volume {name} failed verification: {failed}")


@app.command("extend")
def extend(
    name: Name,
    size: Annotated[str, typer.Option("--size", help="The new usable size: 2G, 1536M, …")],
    domain: Annotated[
        str | None,
        typer.Option(
            "--domain", help="Online: the running VM on this host the volume is attached to."
        ),
    ] = None,
    libvirt_uri: Libvirt = DEFAULT_LIBVIRT,
    node: NodeOption = None,
    node_key: NodeKeyOption = None,
    as_json: AsJson = False,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Grow a volume to a new usable size (the LUKS header comes on top); shrinking is refused.

    Detached (owner or admin): on every backend. Attached, with --domain, on the
    VM's host as the attachment's holder (--node/--node-key): the disk grows
    in the running VM (file and QEMU-LUKS RBD volumes)."""
    size_bytes = parse_size(size)
    if domain is None:
        if node is not None or node_key is not None:
            raise UsageError("--node and --node-key go with --domain (an online extend)")
        with connect(server, ca) as client:
            volume = client.extend_volume(name, size_bytes)
    else:
        from trustplane.agent.volume_attach import extend_attached_volume
        from trustplane.volumes.attachers.libvirt import LibvirtAttacher

        with _client(server, ca, node, node_key) as client:
            volume = extend_attached_volume(
                client, LibvirtAttacher(libvirt_uri), name, domain, size_bytes
            )
    if as_json:
        emit_json(volume)
        return
    stdout.print(f"volume {volume.name}: {_size(volume.size)}")


@app.command("rotate-key")
def rotate_key(name: Name, as_json: AsJson = False, server: Server = None, ca: Ca = None) -> None:
    """Rotate a detached volume's wrapping key: a new KMS key gets a LUKS key slot,
    the old key's slot is erased and the old key destroyed (no data is copied)."""
    with connect(server, ca) as client:
        before = client.volume(name).key_id
        volume = client.rotate_volume_key(name)
    if as_json:
        emit_json(volume)
        return
    stdout.print(f"volume {volume.name}: key {volume.key_id} (was {before}, destroyed)")


@app.command("reencrypt")
def reencrypt(name: Name, as_json: AsJson = False, server: Server = None, ca: Ca = None) -> None:
    """Re-encrypt a detached volume under a new master key and a new KMS key: the data
    is copied into new storage, then the old storage and the old key are destroyed.

    The server records the bytes copied: after a crash it carries on at its
    next start, or when this is run again. A progress bar shows the copy."""
    with connect(server, ca) as client:
        before = client.volume(name).key_id
    result = _copying(
        server,
        ca,
        f"re-encrypting {name}",
        lambda c: c.reencrypt_volume(name),
        lambda c: c.reencryption(name),
    )
    if as_json:
        emit_json(result)
        return
    stdout.print(
        f"volume {result.name}: re-encrypted under key {result.key_id} "
        f"(was {before}, destroyed with the old storage)"
    )


@app.command("clone")
def clone(
    name: Name,
    new: Annotated[str, typer.Argument(metavar="NEW", help="The clone's name.")],
    volume_type: Annotated[
        str | None, typer.Option("--type", help="The clone's volume type (default: the source's).")
    ] = None,
    as_json: AsJson = False,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Clone a detached volume under a fresh key: the data re-encrypted under a new
    master key (QEMU LUKS1 volumes). Neither volume's key opens the other."""
    volume = _copying(
        server,
        ca,
        f"clone {name}",
        lambda c: c.clone_volume(name, new, volume_type),
        lambda c: c.volume_copy(new),
    )
    if as_json:
        emit_json(volume)
        return
    size = _size(volume.size)
    stdout.print(f"volume {volume.name}: clone of {name}, {size}, key {volume.key_id}")


@app.command("snapshot")
def snapshot(
    name: Name,
    snap: Annotated[str, typer.Argument(metavar="SNAP", help="The snapshot's name.")],
    as_json: AsJson = False,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """A point-in-time copy of a detached volume: a clone under its own key (a full copy;
    README, "Clone, snapshot, encrypt in place")."""
    volume = _copying(
        server,
        ca,
        f"snapshot {name}",
        lambda c: c.clone_volume(name, snap, snapshot=True),
        lambda c: c.volume_copy(snap),
    )
    if as_json:
        emit_json(volume)
        return
    stdout.print(f"snapshot {volume.name} of {name}: {_size(volume.size)}, key {volume.key_id}")


@app.command("encrypt")
def encrypt(
    new: Annotated[str, typer.Argument(metavar="NEW", help="The encrypted volume's name.")],
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="Plaintext storage on the type's backend: file SOURCE.img in its directory, "
            "RBD image SOURCE, iSCSI target …:SOURCE. NEW = SOURCE takes its place.",
        ),
    ],
    volume_type: Annotated[str, typer.Option("--type", help="The volume type.")],
    as_json: AsJson = False,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Encrypt plaintext storage in place (admins): copied into a new LUKS volume of the
    same usable size, swapped, then the plaintext storage is destroyed. Refused while
    the storage is in use (a process or VM has it open, an RBD watcher, an initiator)."""
    volume = _copying(
        server,
        ca,
        f"encrypt {source}",
        lambda c: c.encrypt_volume(source, new, volume_type),
        lambda c: c.volume_copy(new),
    )
    if as_json:
        emit_json(volume)
        return
    stdout.print(
        f"volume {volume.name}: {source} encrypted, {_size(volume.size)}, key {volume.key_id}; "
        "the plaintext storage is destroyed"
    )


@app.command("attach")
def attach(
    name: Name,
    domain: Domain,
    live: Annotated[
        bool, typer.Option("--live", help="Also hot-plug it into the running domain.")
    ] = False,
    libvirt_uri: Libvirt = DEFAULT_LIBVIRT,
    node: NodeOption = None,
    node_key: NodeKeyOption = None,
    ceph_key_file: CephKeyFile = None,
    state_dir: TransportStateDir = DEFAULT_STATE_DIR,
    as_json: AsJson = False,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Attach a volume to a VM on this host: the key from the control plane into libvirt."""
    # Imported here: libvirt-python loads libvirt, which no other command needs.
    from trustplane.agent.volume_attach import attach_volume
    from trustplane.volumes.access import NodeCredentials
    from trustplane.volumes.attachers.libvirt import LibvirtAttacher
    from trustplane.volumes.transport_key import NodeTransport

    credentials = NodeCredentials(ceph_key=_ceph_key(ceph_key_file))
    # A node's key comes wrapped to its certified transport key; a user's to a throw-away one.
    transport = NodeTransport.of_node(state_dir if node else None)
    with _client(server, ca, node, node_key) as client:
        volume, attachment = attach_volume(
            client,
            LibvirtAttacher(libvirt_uri),
            name,
            domain,
            live=live,
            credentials=credentials,
            transport=transport,
        )
    if as_json:
        emit_json(attachment)
        return
    how = "hot-plugged and persistent" if live else "persistent (at the next start)"
    stdout.print(
        f"attached volume {volume.name} to {domain} as {attachment.target} "
        f"(serial {attachment.serial}), {how}"
    )


@app.command("detach")
def detach(
    name: Name,
    domain: Domain,
    libvirt_uri: Libvirt = DEFAULT_LIBVIRT,
    node: NodeOption = None,
    node_key: NodeKeyOption = None,
    server: Server = None,
    ca: Ca = None,
) -> None:
    """Detach a volume from a VM on this host; its libvirt secret is undefined."""
    from trustplane.agent.volume_attach import detach_volume
    from trustplane.volumes.attachers.libvirt import LibvirtAttacher

    with _client(server, ca, node, node_key) as client:
        detach_volume(client, LibvirtAttacher(libvirt_uri), name, domain)
    stdout.print(f"detached volume {name} from {domain}; its secret is gone")


def _copying(
    server: str | None,
    ca: Path | None,
    description: str,
    request: Callable[[ControlClient], VolumeInfo],
    progress: Callable[[ControlClient], VolumeOperationInfo],
) -> VolumeInfo:
    """Send a request that copies a volume (re-encrypt, clone, encrypt) and, on a
    terminal, show its progress: the server records it in the operation's row, read
    here every half second on a second connection."""
    with connect(server, ca) as client, Reporter() as reporter:
        if not reporter.console.is_terminal:
            return request(client)
        outcome: list[VolumeInfo | BaseException] = []

        def send() -> None:
            try:
                outcome.append(request(client))
            except BaseException as exc:  # handed to the caller's thread as it is
                outcome.append(exc)

        worker = threading.Thread(target=send, name="trustplane-copy", daemon=True)
        worker.start()
        with connect(server, ca) as poller:
            advance, shown = None, 0
            while worker.is_alive():
                worker.join(0.5)
                try:
                    now = progress(poller)
                except TrustplaneError:
                    continue  # not started yet, or finished meanwhile
                if advance is None:
                    advance = reporter.bar(description, now.total)
                advance(now.progress - shown)
                shown = now.progress
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result


@contextmanager
def _client(
    server: str | None, ca: Path | None, node: str | None, node_key: Path | None
) -> Iterator[ControlClient]:
    """The login's client, or one logged in as `node` with its key."""
    if (node is None) != (node_key is None):
        raise UsageError("give --node and --node-key together (or neither: the login)")
    if node is None or node_key is None:
        with connect(server, ca) as client:
            yield client
        return
    from trustplane.crypto.node_assertion import load_node_key

    signing = load_node_key(read_file(node_key, "--node-key"), f"--node-key {node_key}")
    session = load()
    url = server or (session.server if session else None)
    if url is None:
        raise UsageError("no control plane: give --server (or run trustplane login first)")
    if ca is None and session is not None and session.server.rstrip("/") == url.rstrip("/"):
        ca = Path(session.ca_file) if session.ca_file else None
    with ControlClient(url, ca) as client:
        client.login_as_node(node, signing)
        yield client


def _ceph_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    text = read_file(path, "--ceph-key-file").strip()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"--ceph-key-file {path}: not a base64 cephx key") from None


def _size(size: int) -> str:
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def _print_volume(v: VolumeInfo) -> None:
    lines = [
        f"volume     {v.name} ({v.id})",
        f"state      {v.state}",
        f"size       {_size(v.size)}",
        f"type       {v.volume_type} (backend {v.backend}, engine {v.engine})",
        f"key        {v.key_id} (in the KMS; never stored here)",
        f"owner      {v.owner}",
    ]
    if v.location is not None:
        lines.append(f"location   {v.location.describe()}")
    if v.header is not None:
        lines.append(f"header     LUKS{v.header.version} {v.header.uuid} {v.header.digest}")
    if v.attachment is not None:
        lines.append(f"attached   {v.attachment.domain} ({v.attachment.subject})")
    stdout.print("\n".join(lines))
