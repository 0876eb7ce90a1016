"""The node's attester: enrolment with the control plane, layer measurement
into a PCR with an event log, and quotes on request.

The event log lives in the agent's state directory (`event-log.json`,
replaced atomically). It holds every extension of the measurement PCR since
it was last reset, in order, so the verifier can replay it; a log that does
not match the PCR any more (a reboot, another writer) is detected at the
next attestation, which then fails.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustplane.agent.tpm import Identity, Tpm
from trustplane.client import ControlClient
from trustplane.errors import MalformedError
from trustplane.oci.layout import atomic_write
from trustplane.trust.attestation import Event, replay

logger = logging.getLogger("trustplane.agent")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EventLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[Event] = []
        if path.exists():
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise MalformedError(f"{path}: unreadable event log ({exc})") from None
            self.events = [Event.from_json(item) for item in raw]

    def append(self, event: Event) -> None:
        self.events.append(event)
        self._save()

    def clear(self) -> None:
        self.events = []
        self._save()

    def to_json(self) -> list[dict[str, Any]]:
        return [event.to_json() for event in self.events]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.to_json(), indent=1).encode(), mode=0o600)


@dataclass(frozen=True)
class Layer:
    index: int
    blob: str
    """sha256 of the plain compressed blob."""
    diff_id: str


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    interval: float | None = None
    """How often the verifier wants a quote from this node (seconds)."""


class Attester:
    def __init__(self, tpm: Tpm, state_dir: Path, pcr: int = 23) -> None:
        self.tpm = tpm
        self.pcr = pcr
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log = EventLog(state_dir / "event-log.json")
        if not self.log.events:
            # A fresh log starts from the PCR's reset value (PCRs 16 and 23 only).
            self.tpm.reset(pcr)
        elif replay(self.log.events).get(pcr) != self.tpm.read(pcr):
            # The TPM was restarted (or someone else extended the PCR): the log
            # explains nothing any more. Start over; images must be re-measured.
            logger.warning("PCR %d does not match the event log; starting a new log", pcr)
            self.tpm.reset(pcr)
            self.log.clear()

    def identity(self) -> Identity:
        return self.tpm.identity()

    def enroll(self, client: ControlClient, transport_key_pem: str) -> None:
        """Register EK and AK, activate the credential, certify the transport key."""
        ident = self.tpm.identity()
        challenge = client.json(
            "POST",
            "/v1/attestation/enroll",
            json={
                "ek_public": _b64(ident.ek_public),
                "ek_certificate": _b64(ident.ek_cert) if ident.ek_cert else None,
                "ak_public": _b64(ident.ak_public),
                "ak_name": _b64(ident.ak_name),
            },
        )
        secret = self.tpm.activate_credential(
            base64.b64decode(challenge["credential_blob"]),
            base64.b64decode(challenge["encrypted_secret"]),
        )
        self.activate(client, secret, transport_key_pem)

    def activate(self, client: ControlClient, secret: bytes, transport_key_pem: str) -> None:
        client.json(
            "POST",
            "/v1/attestation/activate",
            json={
                "secret": _b64(secret),
                "transport_key": transport_key_pem,
                "transport_signature": _b64(self.tpm.sign_external(transport_key_pem.encode())),
            },
        )

    def measure(self, image: str, manifest: str, layers: list[Layer]) -> None:
        """Extend each layer's blob digest and diff_id, logging each first."""
        for layer in layers:
            for kind, digest in (("blob", layer.blob), ("diff_id", layer.diff_id)):
                self.record(Event(self.pcr, digest, image, manifest, layer.index, kind))

    def record(self, event: Event) -> None:
        # Logged before the extension: a crash in between leaves a log that
        # no longer replays (detected), never an extension nobody can explain.
        self.log.append(event)
        self.tpm.extend(event.pcr, bytes.fromhex(event.digest.split(":", 1)[1]))

    def quote(self, nonce: bytes) -> dict[str, Any]:
        result = self.tpm.quote(nonce, (self.pcr,))
        return {
            "nonce": nonce.hex(),
            "quote": _b64(result.attest),
            "signature": _b64(result.signature),
            "event_log": self.log.to_json(),
        }

    def attest(self, client: ControlClient) -> Verdict:
        """One round: nonce, quote, verdict."""
        challenge = client.json("GET", "/v1/attestation/nonce")
        nonce = bytes.fromhex(challenge["nonce"])
        answer = client.json("POST", "/v1/attestation/quote", json=self.quote(nonce))
        interval = challenge.get("interval_seconds")
        return Verdict(
            bool(answer["passed"]),
            str(answer["reason"]),
            float(interval) if isinstance(interval, int | float) else None,
        )
