"""What the volume plugin needs from the block-storage service.

The control plane keeps the volumes (record, key UUID) and releases a
volume's key to a node (`volume.attach` in the policy, attestation-gated
where the policy says so, logged). The plugin codes against this Protocol;
`control_service.ControlVolumeService` is the control plane's client
behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from trustplane.api.volume_location import AnyLocation
from trustplane.api.volume_spec import Engine
from trustplane.api.volumes import HeaderFingerprint
from trustplane.volumes.access import NodeCredentials

if TYPE_CHECKING:
    from trustplane.volumes.attachers.docker_plugin.lease import LeaseUse


@dataclass(frozen=True)
class VolumeInfo:
    """A volume as the service knows it (no secret)."""

    name: str
    volume_type: str
    size: int
    """Usable bytes."""


@dataclass(frozen=True)
class AttachMaterial:
    """What opening a volume on this node takes: where it is, how it opens, its key."""

    name: str
    location: AnyLocation
    engine: Engine
    fingerprint: HeaderFingerprint | None
    key: bytes = field(repr=False)
    credentials: NodeCredentials = field(default_factory=NodeCredentials, repr=False)


class VolumeService(Protocol):
    """The block-storage service as the plugin sees it (errors: TrustplaneError)."""

    def create(self, name: str, volume_type: str, size: int) -> VolumeInfo:
        """Create volume `name` (its key ordered from the KMS by the service)."""
        ...

    def delete(self, name: str) -> None:
        """Destroy the volume: its key first (crypto-shredding), then its storage."""
        ...

    def get(self, name: str) -> VolumeInfo:
        """The volume; NotFoundError when there is none."""
        ...

    def list(self) -> list[VolumeInfo]:
        """Every volume this node may see."""
        ...

    def attach(self, name: str) -> AttachMaterial:
        """Release the volume's key to this node (refused: AuthError, Forbidden, ...)."""
        ...

    def detached(self, name: str) -> None:
        """The volume is closed on this node again (the key is forgotten)."""
        ...

    def report_lease_uses(self, uses: Sequence[LeaseUse]) -> None:
        """Log opens made with a leased key while the control plane was unreachable."""
        ...
