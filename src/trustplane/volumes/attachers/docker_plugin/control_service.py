"""The control plane's block-storage service behind the plugin's `VolumeService`.

Every call logs in as this node afresh (a single-use assertion signed with
the node's key), so the plugin holds no long-lived token. The key release
is the attach of volume NAME to the domain `docker` on this node: the
control plane decides it (`volume.attach` on `volume:NAME` for
`node:NODE`, through the attestation gate when the policy asks), records
the attachment until the plugin detaches, and logs both. The key comes
wrapped to the node's transport key (the agent's TPM-certified one from
`state_dir`, else a throw-away pair) and is unwrapped here, in memory. Opens made
with a leased key during an outage (`lease`) are reported afterwards as
`volume.lease` entries (`POST /v1/reports`, as this node).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from trustplane.api.reports import Report
from trustplane.api.volumes import VolumeInfo as ApiVolume
from trustplane.client import ControlClient
from trustplane.errors import IntegrityError
from trustplane.volumes.access import NodeCredentials
from trustplane.volumes.attachers.docker_plugin.lease import LeaseUse
from trustplane.volumes.attachers.docker_plugin.service import AttachMaterial, VolumeInfo
from trustplane.volumes.transport_key import NodeTransport

DOMAIN = "docker"
"""The consumer an attach names: the Docker volume plugin of the attaching node."""


class ControlVolumeService:
    """`VolumeService` over the typed control-plane client, as this node."""

    def __init__(
        self,
        connect: Callable[[], ControlClient],
        credentials: NodeCredentials | None = None,
        domain: str = DOMAIN,
        state_dir: Path | None = None,
    ) -> None:
        self.connect = connect
        self.credentials = credentials or NodeCredentials()
        self.domain = domain
        self.state_dir = state_dir

    def create(self, name: str, volume_type: str, size: int) -> VolumeInfo:
        with self.connect() as client:
            return _info(client.create_volume(name, size, volume_type))

    def delete(self, name: str) -> None:
        with self.connect() as client:
            client.delete_volume(name)

    def get(self, name: str) -> VolumeInfo:
        with self.connect() as client:
            return _info(client.volume(name))

    def list(self) -> list[VolumeInfo]:
        with self.connect() as client:
            return [_info(volume) for volume in client.volumes()]

    def attach(self, name: str) -> AttachMaterial:
        transport = NodeTransport.of_node(self.state_dir)  # read each time: enrolment may change it
        with self.connect() as client:
            release = client.attach_volume(name, self.domain, transport.public_pem)
        volume = release.volume
        if volume.location is None or volume.engine is None:
            raise IntegrityError(f"volume {name}: the control plane has no location for it")
        return AttachMaterial(
            name=volume.name,
            location=volume.location,
            engine=volume.engine,
            fingerprint=volume.header,
            key=transport.open(release),
            credentials=self.credentials,
        )

    def detached(self, name: str) -> None:
        with self.connect() as client:
            client.detach_volume(name, self.domain)

    def report_lease_uses(self, uses: Sequence[LeaseUse]) -> None:
        reports = [
            Report(
                kind="volume.lease",
                time=use.time,
                details={
                    "volume": use.volume,
                    "domain": self.domain,
                    "released": use.released,
                    "expires": use.expires,
                },
            )
            for use in uses
        ]
        with self.connect() as client:
            client.report(reports)


def _info(volume: ApiVolume) -> VolumeInfo:
    return VolumeInfo(name=volume.name, volume_type=volume.volume_type, size=volume.size)
