"""Attach and detach on the compute side: the volume's key from the control plane, into libvirt.

What Nova does for an encrypted volume: ask the block-storage service for
the volume's key (released by the policy's `volume.attach`, logged, the
attachment recorded), put it in an ephemeral private libvirt secret and the
disk into the domain (volumes/attachers/libvirt.py), and let QEMU decrypt.
The key comes wrapped to the node's transport key (`transport`: the
agent's TPM-certified pair, else a throw-away one) and is unwrapped in
memory, held only for the attach and handed to libvirt from bytes; it is
never written, logged or put on a command line.

A failed attach leaves nothing: the attacher undefines what it defined, and
the control plane's attachment record is cleared, so the volume can be
attached again (here or elsewhere).
"""

from __future__ import annotations

import contextlib

from trustplane.api.volumes import VolumeInfo
from trustplane.client import ControlClient
from trustplane.errors import IntegrityError, TrustplaneError, UsageError
from trustplane.volumes.access import NodeCredentials
from trustplane.volumes.attachers.libvirt import LibvirtAttacher, VolumeAttachment, serial_for
from trustplane.volumes.online import block_resize_bytes
from trustplane.volumes.transport_key import NodeTransport


def attach_volume(
    client: ControlClient,
    attacher: LibvirtAttacher,
    name: str,
    domain: str,
    *,
    live: bool,
    credentials: NodeCredentials | None = None,
    transport: NodeTransport | None = None,
) -> tuple[VolumeInfo, VolumeAttachment]:
    """Fetch the key of volume `name` and attach the volume to `domain` (persistent,
    and hot-plugged when `live`)."""
    transport = transport or NodeTransport.ephemeral()
    release = client.attach_volume(name, domain, transport.public_pem)
    volume = release.volume
    try:
        if volume.location is None or volume.header is None or volume.engine is None:
            raise UsageError(f"volume {name} is {volume.state}; it has no storage to attach")
        attachment = attacher.attach(
            domain,
            name,
            volume.location,
            transport.open(release),
            volume.header,
            engine=volume.engine,
            credentials=credentials,
            live=live,
            persistent=True,
        )
    except BaseException:
        with contextlib.suppress(TrustplaneError):
            client.detach_volume(name, domain)
        raise
    return volume, attachment


def extend_attached_volume(
    client: ControlClient, attacher: LibvirtAttacher, name: str, domain: str, size: int
) -> VolumeInfo:
    """Grow volume `name`, attached to the running `domain` here, to `size` usable bytes.

    The control plane checks that this caller holds the attachment and logs
    the start (control/volume_extend.py); the disk is resized through libvirt
    and its capacity read back; the outcome is reported, and the record's size
    changes only if the disk has `size` usable bytes now."""
    volume = client.extend_volume(name, size, domain)
    if volume.size == size and volume.state != "extending":
        return volume  # it has that size already
    try:
        if volume.engine is None or volume.header is None:
            raise UsageError(f"volume {name} is {volume.state}; it has no storage to extend")
        wanted = block_resize_bytes(volume.engine, volume.header.header_bytes, size)
        seen = attacher.resize(domain, serial_for(name), wanted)
        if seen != size:
            raise IntegrityError(
                f"volume {name} in {domain}: {seen} usable bytes after the resize to {size}"
            )
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, TrustplaneError) else type(exc).__name__
        with contextlib.suppress(TrustplaneError):
            client.finish_online_extend(name, domain, size, grown=False, reason=reason[:500])
        raise
    return client.finish_online_extend(name, domain, size, grown=True)


def detach_volume(
    client: ControlClient, attacher: LibvirtAttacher, name: str, domain: str
) -> VolumeInfo:
    """Remove the volume's disk and secrets from `domain`, then clear the attachment record."""
    attacher.detach(domain, serial_for(name))
    return client.detach_volume(name, domain)
