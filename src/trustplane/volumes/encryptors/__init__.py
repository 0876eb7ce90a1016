"""Encryptors, one per engine behind `Encryptor`: QEMU's LUKS, dm-crypt, librbd."""

from __future__ import annotations

from trustplane.api.volume_spec import Engine
from trustplane.tools import Executor
from trustplane.volumes.encryptors.base import DEFAULT_ITER_TIME_MS, Encryptor
from trustplane.volumes.encryptors.dm_crypt import DmCryptEncryptor
from trustplane.volumes.encryptors.librbd import LibrbdEncryptor
from trustplane.volumes.encryptors.qemu_luks import QemuLuksEncryptor
from trustplane.volumes.opening import OpenVolume

_ENCRYPTORS: dict[Engine, type[Encryptor]] = {
    Engine.QEMU: QemuLuksEncryptor,
    Engine.DM_CRYPT: DmCryptEncryptor,
    Engine.LIBRBD: LibrbdEncryptor,
}


def encryptor_for(
    engine: Engine, executor: Executor | None = None, *, iter_time_ms: int = DEFAULT_ITER_TIME_MS
) -> Encryptor:
    """The encryptor of `engine`, running its tools through `executor`."""
    return _ENCRYPTORS[engine](executor, iter_time_ms=iter_time_ms)


__all__ = [
    "DmCryptEncryptor",
    "Encryptor",
    "LibrbdEncryptor",
    "OpenVolume",
    "QemuLuksEncryptor",
    "encryptor_for",
]
