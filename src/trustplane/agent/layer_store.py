"""The layer store on an attested node: measure, attest, then ask for keys.

When a node imports an image into its layer store or opens a view, each
layer's diff_id (and plain blob digest, once known) is extended into the
node's measurement PCR with an event-log entry, as `trustplane run` does,
and the node attests; only then does it ask the control plane for layer
keys, wrapped to the transport key its TPM certified at enrolment. A
policy that requires attestation for `key.release` thus releases layer
keys only to nodes whose fresh quote shows those layers measured.
"""

from __future__ import annotations

from collections.abc import Sequence

from trustplane.agent.attester import Attester
from trustplane.agent.service import Agent
from trustplane.agent.tpm_lock import node_tpm
from trustplane.client import ControlClient
from trustplane.errors import Forbidden
from trustplane.images.kms_unwrap import KmsUnwrapper
from trustplane.layerstore.keys import ControlPlaneKeys, MeasuredLayer, Transport
from trustplane.trust.attestation import Event


class NodeMeasurer:
    """`layerstore.Measurer` for this node: PCR + event log, then a fresh quote."""

    def __init__(self, agent: Agent, client: ControlClient) -> None:
        self.agent = agent
        self.client = client

    def measure(
        self, repository: str, manifest_digest: str, layers: Sequence[MeasuredLayer]
    ) -> None:
        config = self.agent.config
        events = [
            Event(config.pcr, digest, repository, manifest_digest, layer.index, kind)
            for layer in layers
            for kind, digest in (("blob", layer.digest), ("diff_id", layer.diff_id))
            if digest is not None
        ]
        with node_tpm(config.tcti, config.state_dir) as tpm:
            if not self.agent.enrolled(tpm):
                raise Forbidden(
                    f"attestation: node {config.node} has not enrolled this TPM "
                    "with the control plane (start trustplane agent first)"
                )
            attester = Attester(tpm, config.state_dir, config.pcr)
            known = set(attester.log.events)
            for event in events:
                # What the log holds is in the PCR already.
                if event not in known:
                    attester.record(event)
                    known.add(event)
            verdict = attester.attest(self.client)
        if not verdict.passed:
            raise Forbidden(f"attestation: {verdict.reason}")


def node_transport(agent: Agent) -> Transport:
    """The transport key pair the node's TPM certified."""
    state = agent.config.state_dir
    return Transport((state / "transport.pem").read_bytes(), agent.transport_public)


def node_keys(agent: Agent, client: ControlClient) -> tuple[ControlPlaneKeys, KmsUnwrapper]:
    """Layer-chain keys and image-layer unwrapping, both to the certified transport key."""
    transport = node_transport(agent)
    return (
        ControlPlaneKeys(client, transport),
        KmsUnwrapper(client, (transport.private_pem, transport.public_pem)),
    )
