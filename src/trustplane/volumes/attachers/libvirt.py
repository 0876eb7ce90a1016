"""Attach an encrypted volume to a libvirt domain; QEMU (or librbd) decrypts.

What Nova does for a LUKS volume, in one place:

1. The volume's header is checked against the record (`HeaderFingerprint`)
   before libvirt is touched: a replaced or re-formatted volume is refused.
2. A libvirt secret, ephemeral (never written to disk, gone when libvirtd
   restarts) and private (nobody reads it back), gets the LUKS passphrase
   as bytes (`secretSetValue`; `virsh secret-set-value --file` would
   base64-decode a file silently). An RBD volume gets a second one, of
   usage `ceph`, with the cephx key.
3. The disk goes into the domain with `<encryption format='luks'><secret
   type='passphrase' uuid='…'/></encryption>` inside `<source>` (and
   `<auth username='…'><secret type='ceph' uuid='…'/></auth>` for RBD;
   `<encryption format='luks2' engine='librbd'>` for librbd's own
   encryption): hot-plugged into the running domain, written into its
   persistent definition, or both. libvirt hands QEMU the key wrapped under
   a per-domain master key, never on a command line.
4. Detach removes the disk from both and undefines the secrets.

Every failure is one line and undoes what this attach did: a wrong key
(QEMU: `Invalid password, cannot unlock any keyslot`) is DecryptionKeyError
with no secret left; libvirt that does not answer fails the attach closed
(its secrets were ephemeral: they went with the daemon). A LUKS1 volume
that dm-crypt formatted (LVM) is attached the same way: QEMU reads it
(Nova's native LUKS). libvirt 9.0 cannot
hot-plug a disk with librbd encryption (`blockdev-add: No secret with id
'libvirt-N-format-encryption-secret0'`): such a disk goes into the
persistent definition and takes effect when the domain starts.

The guest names disks in probe order, so the target name (`vdb`) says
little inside it; the disk's `<serial>` (the volume name, at most 20
characters for virtio-blk) is what a guest can look for.
"""

from __future__ import annotations

import contextlib
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, Literal, cast

import libvirt
from pydantic import BaseModel, ConfigDict

from trustplane.api.volume_location import (
    AnyLocation,
    FileLocation,
    IscsiLocation,
    LvmLocation,
    RbdLocation,
)
from trustplane.api.volume_spec import Engine
from trustplane.api.volumes import HeaderFingerprint
from trustplane.errors import (
    DecryptionKeyError,
    NotFoundError,
    TrustplaneError,
    UnavailableError,
    UnsupportedError,
    UsageError,
)
from trustplane.tools import Executor
from trustplane.volumes.access import NodeCredentials
from trustplane.volumes.encryptors import LibrbdEncryptor, encryptor_for
from trustplane.volumes.encryptors.base import check_key_bytes, passphrase

SERIAL_LENGTH = 20
"""virtio-blk serial numbers are at most 20 bytes."""
DETACH_TIMEOUT = 30.0
_WRONG_KEY = ("Invalid password, cannot unlock any keyslot", "encryption load fail")
_LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
_CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG

Connect = Callable[[str], Any]
"""Opens a libvirt connection (`libvirt.open`); tests may wrap it."""


class VolumeAttachment(BaseModel):
    """Where an attached volume is: what detach needs (no secret in it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str
    target: str
    serial: str
    secrets: tuple[str, ...]
    """UUIDs of the libvirt secrets this attach defined."""
    live: bool
    persistent: bool
    engine: Engine


def _message(exc: libvirt.libvirtError) -> str:
    text = exc.get_error_message() or str(exc)
    return " ".join(text.split())


def _is_connection_error(exc: libvirt.libvirtError) -> bool:
    code = exc.get_error_code()
    domain = exc.get_error_domain()
    return bool(
        code in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT)
        or domain in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
        or "End of file while reading data" in _message(exc)
    )


def serial_for(name: str) -> str:
    """The disk serial a guest sees: the volume name, cut to 20 characters."""
    return name[:SERIAL_LENGTH]


class LibvirtAttacher:
    """Attaches located, encrypted volumes to domains of one libvirt connection URI."""

    def __init__(
        self,
        uri: str,
        *,
        executor: Executor | None = None,
        connect: Connect | None = None,
    ) -> None:
        self.uri = uri
        self.executor = executor or Executor()
        self._connect: Connect = connect or libvirt.open

    # -- the connection -----------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self, what: str) -> Any:
        try:
            conn = self._connect(self.uri)
        except libvirt.libvirtError as exc:
            raise UnavailableError(f"{what}: libvirt does not answer: {_message(exc)}") from None
        try:
            yield conn
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    @staticmethod
    def _domain(conn: Any, name: str) -> Any:
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFoundError(f"no libvirt domain {name!r}") from None
            raise

    # -- attach ---------------------------------------------------------------------

    def attach(
        self,
        domain: str,
        name: str,
        location: AnyLocation,
        key: bytes,
        fingerprint: HeaderFingerprint,
        *,
        engine: Engine = Engine.QEMU,
        credentials: NodeCredentials | None = None,
        live: bool = True,
        persistent: bool = True,
        target: str | None = None,
    ) -> VolumeAttachment:
        """Attach volume `name` at `location`, encrypted under `key`, to `domain`.

        `live`: hot-plug into the running domain; `persistent`: write it into
        the domain's definition (both by default). Refused before libvirt is
        touched: a header that is not `fingerprint` (IntegrityError), a
        live librbd attach (UnsupportedError).
        """
        what = f"attach of volume {name} to {domain}"
        check_key_bytes(key)
        if not (live or persistent):
            raise UsageError(f"{what}: nothing to do (neither live nor persistent)")
        if engine is Engine.DM_CRYPT:
            if fingerprint.version != 1:
                raise UnsupportedError(
                    f"{what}: a LUKS2 dm-crypt volume is opened by the host (cryptsetup) and "
                    "attached as a plain block device; QEMU 7.2 reads LUKS1 only"
                )
            # cryptsetup's LUKS1 is the format QEMU's driver reads: QEMU decrypts it.
            engine = Engine.QEMU
        if engine is Engine.LIBRBD and live:
            raise UnsupportedError(
                f"{what}: libvirt 9.0 cannot hot-plug a disk with librbd encryption "
                "(blockdev-add: No secret with id 'libvirt-N-format-encryption-secret0'); "
                "attach it persistently (not live) and start the domain"
            )
        if isinstance(location, RbdLocation):
            (credentials or NodeCredentials()).require_ceph_key(location)
        encryptor = encryptor_for(engine, self.executor)
        encryptor.verify_header(location, fingerprint, credentials)
        if not live:
            # Nothing checks the key before the domain starts: check it now.
            if isinstance(encryptor, LibrbdEncryptor):
                encryptor.check_key(location, key, credentials, luks_version=fingerprint.version)
            else:
                encryptor.check_key(location, key, credentials)
        with self._connection(what) as conn:
            dom = self._domain(conn, domain)
            active = bool(dom.isActive())
            if live and not active:
                raise UsageError(f"{what}: the domain is not running (attach it persistently)")
            chosen = target or _free_target(dom, persistent=persistent, live=live)
            serial = serial_for(name)
            defined: list[Any] = []
            try:
                volume_secret = _define_secret(
                    conn, "volume", f"trustplane/{name}/{uuid.uuid4()}", passphrase(key)
                )
                defined.append(volume_secret)
                ceph_secret = None
                if isinstance(location, RbdLocation):
                    ceph_key = (credentials or NodeCredentials()).require_ceph_key(location)
                    ceph_secret = _define_secret(
                        conn, "ceph", f"trustplane {name} {uuid.uuid4()}", ceph_key
                    )
                    defined.append(ceph_secret)
                xml = disk_xml(
                    location,
                    chosen,
                    serial,
                    engine=engine,
                    luks_version=fingerprint.version,
                    volume_secret=volume_secret.UUIDString(),
                    ceph_secret=ceph_secret.UUIDString() if ceph_secret is not None else None,
                )
                flags = (_LIVE if live else 0) | (_CONFIG if persistent else 0)
                dom.attachDeviceFlags(xml, flags)
            except BaseException as exc:
                _undefine(defined)
                if isinstance(exc, libvirt.libvirtError):
                    raise _attach_error(what, exc) from None
                raise
        return VolumeAttachment(
            domain=domain,
            target=chosen,
            serial=serial,
            secrets=tuple(s.UUIDString() for s in defined),
            live=live,
            persistent=persistent,
            engine=engine,
        )

    # -- detach ---------------------------------------------------------------------

    def detach(self, domain: str, serial: str, *, timeout: float = DETACH_TIMEOUT) -> None:
        """Remove the disk with `serial` from `domain` (live and persistent), undefine its secrets.

        Idempotent: a disk that is not there is not an error. Raises
        UnavailableError when the guest does not release a hot-plugged
        disk within `timeout` (its secrets are undefined all the same).
        """
        what = f"detach of {serial} from {domain}"
        with self._connection(what) as conn:
            try:
                dom = self._domain(conn, domain)
            except NotFoundError:
                return
            secrets: set[str] = set()
            pending = False
            try:
                for flag in (_LIVE, _CONFIG):
                    if flag == _LIVE and not dom.isActive():
                        continue
                    xml_flags = libvirt.VIR_DOMAIN_XML_INACTIVE if flag == _CONFIG else 0
                    disk = _find_disk(dom.XMLDesc(xml_flags), serial)
                    if disk is None:
                        continue
                    secrets |= _secret_uuids(disk)
                    dom.detachDeviceFlags(ET.tostring(disk, encoding="unicode"), flag)
                    if flag == _LIVE:
                        pending = not _wait_gone(dom, serial, timeout)
            except libvirt.libvirtError as exc:
                raise UnavailableError(f"{what}: {_message(exc)}") from None
            finally:
                for secret_uuid in secrets:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.secretLookupByUUIDString(secret_uuid).undefine()
            if pending:
                raise UnavailableError(
                    f"{what}: the guest did not release the disk within {timeout:g} s "
                    "(its secrets are undefined; the disk goes when the guest lets it)"
                )

    def resize(self, domain: str, serial: str, size: int) -> int:
        """Grow the disk with `serial` of the running `domain` to `size` bytes (`virsh
        blockresize`, through the executor: QEMU's `block_resize` on the disk's top node,
        the guest told at once); the capacity libvirt reports after (`domblkinfo`)."""
        what = f"resize of {serial} in {domain}"
        with self._connection(what) as conn:
            dom = self._domain(conn, domain)
            try:
                if not dom.isActive():
                    raise UsageError(f"{what}: the domain is not running")
                disk = _find_disk(dom.XMLDesc(0), serial)
            except libvirt.libvirtError as exc:
                raise UnavailableError(f"{what}: {_message(exc)}") from None
        target = disk.find("target") if disk is not None else None
        dev = target.get("dev") if target is not None else None
        if dev is None:
            raise NotFoundError(f"{what}: the domain has no disk with serial {serial}")
        virsh = ["virsh", "--quiet", "-c", self.uri]
        self.executor.run([*virsh, "blockresize", domain, dev, f"{size}B"], timeout=120)
        info = self.executor.run([*virsh, "domblkinfo", domain, dev], timeout=60).text
        for line in info.splitlines():
            label, _, value = line.partition(":")
            if label.strip() == "Capacity" and value.strip().isdigit():
                return int(value.strip())
        raise UnavailableError(f"{what}: virsh domblkinfo gave no capacity")


def _define_secret(conn: Any, usage: Literal["volume", "ceph"], usage_id: str, value: bytes) -> Any:
    root = ET.Element("secret", ephemeral="yes", private="yes")
    ET.SubElement(root, "description").text = "trustplane volume attach"
    usage_element = ET.SubElement(root, "usage", type=usage)
    ET.SubElement(usage_element, "volume" if usage == "volume" else "name").text = usage_id
    secret = conn.secretDefineXML(ET.tostring(root, encoding="unicode"))
    try:
        secret.setValue(value)
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            secret.undefine()
        raise
    return secret


def _undefine(secrets: list[Any]) -> None:
    for secret in secrets:
        with contextlib.suppress(libvirt.libvirtError):
            secret.undefine()


def _attach_error(what: str, exc: libvirt.libvirtError) -> TrustplaneError:
    message = _message(exc)
    if any(needle in message for needle in _WRONG_KEY):
        return DecryptionKeyError(f"{what} refused: the key does not open the volume ({message})")
    if _is_connection_error(exc):
        return UnavailableError(
            f"{what} failed: libvirt stopped answering ({message}); nothing was attached "
            "and the ephemeral secrets went with the daemon"
        )
    return UnavailableError(f"{what} failed: {message}")


def disk_xml(
    location: AnyLocation,
    target: str,
    serial: str,
    *,
    engine: Engine,
    luks_version: int,
    volume_secret: str,
    ceph_secret: str | None = None,
) -> str:
    """The `<disk>` element for an encrypted volume (inside `<source>`: encryption, auth)."""
    disk = ET.Element("disk", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    if isinstance(location, FileLocation):
        disk.set("type", "file")
        source = ET.SubElement(disk, "source", file=location.path)
    elif isinstance(location, LvmLocation):
        disk.set("type", "block")
        source = ET.SubElement(disk, "source", dev=location.device)
    elif isinstance(location, IscsiLocation):
        disk.set("type", "network")
        source = ET.SubElement(
            disk, "source", protocol="iscsi", name=f"{location.iqn}/{location.lun}"
        )
        ET.SubElement(source, "host", name=location.portal.host, port=str(location.portal.port))
    else:
        disk.set("type", "network")
        source = ET.SubElement(disk, "source", protocol="rbd", name=location.spec)
        for monitor in location.monitors:
            ET.SubElement(source, "host", name=monitor.host, port=str(monitor.port))
        if ceph_secret is None:
            raise UsageError("an RBD disk needs the ceph secret")
        auth = ET.SubElement(source, "auth", username=location.user)
        ET.SubElement(auth, "secret", type="ceph", uuid=ceph_secret)
    if engine is Engine.LIBRBD:
        encryption = ET.SubElement(
            source, "encryption", format="luks2" if luks_version == 2 else "luks", engine="librbd"
        )
    else:
        if luks_version != 1:
            raise UnsupportedError("QEMU 7.2's LUKS driver reads LUKS1 only")
        encryption = ET.SubElement(source, "encryption", format="luks")
    ET.SubElement(encryption, "secret", type="passphrase", uuid=volume_secret)
    ET.SubElement(disk, "target", dev=target, bus="virtio")
    ET.SubElement(disk, "serial").text = serial
    return ET.tostring(disk, encoding="unicode")


def _targets(xml: str) -> set[str]:
    root = ET.fromstring(xml)  # noqa: S314 (libvirt's own domain XML)
    return {t.get("dev", "") for t in root.iterfind("./devices/disk/target")}


def _free_target(dom: Any, *, persistent: bool, live: bool) -> str:
    """The first `vdX` free in the definitions the attach touches."""
    used: set[str] = set()
    if live:
        used |= _targets(dom.XMLDesc(0))
    if persistent:
        used |= _targets(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if f"vd{letter}" not in used:
            return f"vd{letter}"
    raise UsageError("the domain has no free virtio disk name left")


def _find_disk(xml: str, serial: str) -> ET.Element | None:
    root = ET.fromstring(xml)  # noqa: S314 (libvirt's own domain XML)
    for disk in root.iterfind("./devices/disk"):
        found = disk.find("serial")
        if found is not None and found.text == serial:
            return disk
    return None


def _secret_uuids(disk: ET.Element) -> set[str]:
    return {s.get("uuid", "") for s in disk.iter("secret") if s.get("uuid")}


def _wait_gone(dom: Any, serial: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if _find_disk(cast(str, dom.XMLDesc(0)), serial) is None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
