"""Open a control-plane volume for containers: header check, user-space open, mount.

The header fingerprint the service recorded is checked against the raw
volume first, so a volume replaced or re-formatted behind the service's
back is refused before the key reaches any tool. The volume is then opened
in user space (`attachers.userspace`: qemu-storage-daemon, FUSE export,
loop device) by its engine: QEMU's LUKS driver (file, iSCSI, RBD
front-end) or librbd's own encryption (RBD back-end). dm-crypt volumes
(LVM, hosts with device-mapper) are not served by the plugin yet.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from trustplane.api.volume_spec import Engine
from trustplane.errors import TrustplaneError, UnsupportedError
from trustplane.tools import Executor
from trustplane.volumes.attachers.docker_plugin.filesystem import require_filesystem
from trustplane.volumes.attachers.docker_plugin.service import AttachMaterial
from trustplane.volumes.attachers.userspace import UserspaceVolume
from trustplane.volumes.encryptors import LibrbdEncryptor, QemuLuksEncryptor, encryptor_for


def open_plaintext(
    executor: Executor, material: AttachMaterial, run_dir: Path | None = None
) -> UserspaceVolume:
    """The volume's plaintext on a loop device (not mounted); nothing left on failure.

    The daemon's private directory goes under `run_dir` (where recovery looks).
    """
    encryptor = encryptor_for(material.engine, executor)
    if material.fingerprint is not None:
        encryptor.verify_header(material.location, material.fingerprint, material.credentials)
    if isinstance(encryptor, QemuLuksEncryptor):
        return encryptor.open(
            material.location, material.key, material.credentials, loop=True, run_dir=run_dir
        )
    if isinstance(encryptor, LibrbdEncryptor):
        version = None if material.fingerprint is None else material.fingerprint.version
        return encryptor.open(
            material.location,
            material.key,
            material.credentials,
            loop=True,
            run_dir=run_dir,
            luks_version=version,
        )
    raise UnsupportedError(
        f"volume {material.name}: {material.engine} volumes are not served by the Docker "
        f"volume plugin (it opens {Engine.QEMU} and {Engine.LIBRBD} volumes in user space)"
    )


def open_mounted(
    executor: Executor, material: AttachMaterial, mountpoint: Path, run_dir: Path | None = None
) -> UserspaceVolume:
    """Open the volume and mount its file system at `mountpoint`; nothing left on failure."""
    volume = open_plaintext(executor, material, run_dir)
    try:
        assert volume.device is not None
        require_filesystem(executor, volume.device, f"volume {material.name}")
        volume.mount(mountpoint)
    except BaseException:
        with contextlib.suppress(TrustplaneError):
            volume.close(force=True)
        raise
    return volume
