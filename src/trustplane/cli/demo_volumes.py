"""The demo's volumes scene: encrypted cloud volumes from the block-storage service into a VM.

A control plane with two volume backends (files in a directory, an RBD pool
on a one-node Ceph cluster) creates one volume on each; the KMS generates
each volume's key and the service keeps only its UUID. Something is written
to each through the encrypted path; the file and the RADOS objects hold none
of it. A compute node (its own key, one policy rule) attaches both to a
running VM: the key comes from the control plane, goes into an ephemeral
private libvirt secret, and QEMU decrypts; the VM reads what was written.
Detach leaves no libvirt secret; the log shows every key release. Then a
container: `trustplane volume-plugin` serves a file volume to a dockerd of
its own (never the shared one), one container writes, a second reads back,
the raw file holds no plaintext and the last unmount leaves no mount, loop
device or daemon. Delete destroys each key first.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import libvirt
import yaml

from trustplane.agent.volume_attach import attach_volume, detach_volume
from trustplane.api.volume_location import FileLocation, RbdLocation
from trustplane.api.volume_spec import EncryptionSpec
from trustplane.atomic import atomic_write
from trustplane.crypto.keys import generate_key_pair
from trustplane.crypto.node_assertion import load_node_key
from trustplane.embedded.ceph import RunningCeph
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.dockerd import ensure_dockerd, make_shared, unmake_shared
from trustplane.embedded.guest_kernel import GuestKernel
from trustplane.embedded.libvirtd import RunningLibvirtd
from trustplane.embedded.sample_images import import_busybox_base
from trustplane.embedded.volume_guest import ScannerGuest, build_scanner_initrd
from trustplane.embedded.volume_plugin import (
    PluginProcess,
    register_volume_node,
    replace_policy,
    volume_node_rules,
)
from trustplane.errors import IntegrityError, NotFoundError
from trustplane.tools import Executor, mount_points
from trustplane.volumes.access import NodeCredentials
from trustplane.volumes.attachers.libvirt import LibvirtAttacher
from trustplane.volumes.encryptors import encryptor_for

Say = Callable[[str, str], None]
NODE = "demo-compute"
DOCKER_NODE = "demo-docker"
TAG = "trustplane/busybox:demo-volumes"
MIB = 1 << 20


def volumes_scene(
    work: Path,
    ceph: RunningCeph,
    libvirtd: RunningLibvirtd,
    kernel: GuestKernel,
    say: Say,
    proved: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Run the scene; returns the log's volume.attach entries (IntegrityError on a miss)."""
    work.mkdir(parents=True, exist_ok=True)
    volumes_dir = work / "storage"
    key_file = work / "ceph-client.key"
    key_file.touch(mode=0o600)
    key_file.write_text(ceph.client.key + "\n")
    data = work / "control-plane" / "data"
    data.mkdir(parents=True, mode=0o700)
    config = {
        "volume_backends": {
            "files": {"kind": "file", "directory": str(volumes_dir)},
            "ceph": {
                "kind": "rbd",
                "pool": ceph.pool,
                "user": ceph.client.user,
                "monitors": [f"{ceph.client.mon_host}:{ceph.client.mon_port}"],
                "key_file": str(key_file),
            },
        }
    }
    (data / "server.yaml").write_text(yaml.safe_dump(config))
    with ExitStack() as stack:
        control = start_control_plane(work / "control-plane", data_dir=data)
        stack.callback(control.stop)
        say("block storage", f"control plane on {control.url} with backends files and ceph")
        admin = stack.enter_context(control.admin())
        admin.create_volume_type("file-luks", "files")
        # Front-end (QEMU's LUKS) on RBD: what libvirt 9.0 can hot-plug into a running VM.
        admin.create_volume_type("rbd-luks", "ceph", EncryptionSpec())
        node_key = work / f"{NODE}.pem"
        private, public = generate_key_pair("ec-p256")
        atomic_write(node_key, private, mode=0o600)
        admin.register_node(NODE, "host", public.decode())
        policy = data / "policy.yaml"
        policy.write_text(
            policy.read_text()
            + f'  - subjects: ["node:{NODE}"]\n    actions: [volume.attach]\n'
            + '    resources: ["volume:*"]\n'
        )
        say(NODE, "registered; one policy rule grants it volume.attach")

        names = {
            "rbd": f"demo-rbd-{secrets.token_hex(2)}",
            "file": f"demo-file-{secrets.token_hex(2)}",
        }
        markers = {kind: f"trustplane-demo-{kind}-{secrets.token_hex(6)}" for kind in names}
        credentials = NodeCredentials(ceph_key=ceph.client.key_bytes)
        created = {}
        for kind, volume_type in (("rbd", "rbd-luks"), ("file", "file-luks")):
            volume = admin.create_volume(names[kind], 16 * MIB, volume_type)
            created[kind] = volume
            say(
                f"volume {volume.name}",
                f"{volume.location.describe() if volume.location else '?'}; key "
                f"{volume.key_id} generated by the KMS (only this UUID is on the record); "
                f"LUKS header {volume.header.uuid if volume.header else '?'}",
            )
            _write(admin, volume.name, markers[kind].encode(), credentials)
        _check_storage(created["file"].location, created["rbd"].location, markers, ceph)
        proved("the file and the RADOS objects hold only ciphertext (LUKS header, then noise)")

        start = admin.health().log_size
        guest_dir = work / "guest"
        guest_dir.mkdir(exist_ok=True)
        initrd = build_scanner_initrd(guest_dir / "initrd.img", kernel)
        conn = libvirt.open(libvirtd.uri)
        stack.callback(conn.close)
        guest = ScannerGuest.define(conn, guest_dir, kernel, initrd)
        stack.callback(guest.remove)
        guest.start()
        say("VM", f"{guest.name} running (TCG) under libvirtd")
        attacher = LibvirtAttacher(libvirtd.uri)
        with control.client() as node:
            node.login_as_node(NODE, load_node_key(node_key.read_bytes(), str(node_key)))
            for kind, name in names.items():
                _, attachment = attach_volume(
                    node, attacher, name, guest.name, live=True, credentials=credentials
                )
                seen = guest.disk_data(name)
                if not seen.startswith(markers[kind]):
                    raise IntegrityError(f"the VM read {seen!r} from {name}, not what was written")
                say(name, f"hot-plugged as {attachment.target}; the VM reads: {seen[:40]}")
            proved("the VM reads the plaintext; QEMU decrypted with the key from the KMS")
            for name in names.values():
                detach_volume(node, attacher, name, guest.name)
                guest.wait_gone(name)
        left = libvirtd.virsh("secret-list", check=True).text.splitlines()[2:]
        if any(line.strip() for line in left):
            raise IntegrityError("a libvirt secret outlived its detach")
        proved("detach removed both disks and undefined their secrets: libvirt holds no key")

        releases = []
        for index in range(start, admin.health().log_size):
            entry = json.loads(admin.log_entry(index))
            if entry["kind"] == "volume.attach":
                releases.append(entry)
                say(
                    f"entry {index}",
                    f"volume.attach {entry['resource']} to {entry['subject']} "
                    f"({entry['domain']}): {entry['decision']}",
                )
        if len([e for e in releases if e["subject"] == f"node:{NODE}"]) < len(names):
            raise IntegrityError("a key release is missing from the log")
        proved("every key release is in the transparency log")

        _containers(work / "docker", control, admin, say, proved)

        for kind, name in names.items():
            key_id = created[kind].key_id
            admin.delete_volume(name)
            try:
                admin.secret(key_id or "")
            except NotFoundError:
                pass
            else:
                raise IntegrityError(f"the key of {name} outlived its volume")
        proved("delete destroyed each key first (crypto-shredding), then the storage")
        return releases


def _write(admin: Any, name: str, marker: bytes, credentials: NodeCredentials) -> None:
    """Write through the encrypted path, in user space, with a key released for it."""
    release = admin.attach_volume(name, "demo-writer")
    volume = release.volume
    try:
        with (
            encryptor_for(volume.engine).open(
                volume.location, release.key_bytes(), credentials
            ) as opened,
            Path(opened.path).open("r+b") as plain,
        ):
            plain.write(marker.ljust(4096, b"\0"))
    finally:
        admin.detach_volume(name, "demo-writer")


def _check_storage(
    file_location: Any, rbd_location: Any, markers: dict[str, str], ceph: RunningCeph
) -> None:
    if not isinstance(file_location, FileLocation) or not isinstance(rbd_location, RbdLocation):
        raise IntegrityError("the volumes are not where their types put them")
    if markers["file"].encode() in Path(file_location.path).read_bytes():
        raise IntegrityError("the file volume holds plaintext")
    for data in ceph.image_objects(rbd_location.image).values():
        if markers["rbd"].encode() in data:
            raise IntegrityError("a RADOS object holds plaintext")


def _containers(
    work: Path,
    control: RunningControlPlane,
    admin: Any,
    say: Say,
    proved: Callable[[str], None],
) -> None:
    """Containers on an encrypted volume, through the Docker volume plugin."""
    work.mkdir(parents=True, exist_ok=True)
    node_key = register_volume_node(admin, work, DOCKER_NODE)
    policy = control.data_dir / "policy.yaml"
    replace_policy(control, policy.read_text() + volume_node_rules(DOCKER_NODE))
    root, plugins = work / "plugin-root", work / "plugins"
    plugins.mkdir(mode=0o700)
    # Short: dockerd's containerd socket paths under its state dir stay below 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="tpd-", dir="/tmp"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, state, ignore_errors=True)
        stack.callback(subprocess.run, ["umount", "-R", str(state / "data")], check=False,
                       capture_output=True)  # fmt: skip
        make_shared(root)
        stack.callback(unmake_shared, root)
        plugin = PluginProcess(
            control, DOCKER_NODE, node_key, plugins / "trustplane.sock", root, work
        )
        plugin.start()
        stack.callback(plugin.stop)
        daemon = ensure_dockerd(
            work, socket=state / "d.sock", state_dir=state, private_network=True,
            plugin_dir=plugins,
        )  # fmt: skip
        stack.callback(daemon.stop)
        client = daemon.client()
        stack.callback(client.close)
        import_busybox_base(client, TAG)
        say("volume plugin", f"trustplane volume-plugin as node {DOCKER_NODE}, for a dockerd "
            "of its own (its /run/docker/plugins holds only this plugin)")  # fmt: skip
        name = f"demo-docker-{secrets.token_hex(2)}"
        client.volumes.create(name, driver="trustplane",
                              driver_opts={"type": "file-luks", "size": "32M"})  # fmt: skip
        marker = f"trustplane-demo-container-{secrets.token_hex(6)}"
        mounts = {name: {"bind": "/data", "mode": "rw"}}

        def run(script: str) -> str:
            out = client.containers.run(TAG, ["sh", "-c", script], volumes=mounts,
                                        network_mode="none", remove=True)  # fmt: skip
            return bytes(out).decode(errors="replace").strip()

        run(f"echo {marker} > /data/note && sync")
        say(name, "docker volume create -d trustplane; a container wrote a note to /data")
        seen = run("cat /data/note")
        if seen != marker:
            raise IntegrityError(f"the second container read {seen!r}, not what was written")
        say(name, f"a second container reads: {seen}")
        location = admin.volume(name).location
        if not isinstance(location, FileLocation):
            raise IntegrityError(f"volume {name} is not a file volume")
        raw = Path(location.path).read_bytes()
        if marker.encode() in raw:
            raise IntegrityError(f"{location.path} holds the container's plaintext")
        say(location.path, f"{len(raw) >> 20} MiB, starts {raw[:6]!r}; the note is not in it")
        proved("a container writes, another reads back; the raw file holds only ciphertext")
        under = f"{root.resolve()}/"
        left = [p for p in mount_points(Executor()) if p.startswith(under)]
        opened = [p.name for p in (root / "run").iterdir()] if (root / "run").exists() else []
        loops = Executor().run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"])
        opened += [line for line in loops.text.splitlines() if line.strip().startswith(under)]
        if left or opened or admin.volume(name).attachment is not None:
            raise IntegrityError(f"the last unmount left {left or opened or 'an attachment'}")
        proved("the last unmount closed it all: no mount, loop device or daemon; key released")
        client.volumes.get(name).remove()
