"""Storage backends, one driver per backend behind `Backend`: file, iscsi, lvm, rbd."""

from __future__ import annotations

from trustplane.volumes.backends.base import Backend
from trustplane.volumes.backends.file import FileBackend
from trustplane.volumes.backends.iscsi import IscsiBackend
from trustplane.volumes.backends.lvm import LvmBackend
from trustplane.volumes.backends.rbd import RbdBackend

__all__ = ["Backend", "FileBackend", "IscsiBackend", "LvmBackend", "RbdBackend"]
