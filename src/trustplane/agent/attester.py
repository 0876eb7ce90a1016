"""The node's attester: enrolment with the control plane, layer measurement
into a PCR with an event log, and quotes on request.

The event log lives in the agent's state directory (`event-log.json`,
replaced atomically): every extension of the measurement PCR in the TPM's
current boot (its resetCount/restartCount), in order, so the verifier can
replay it. The agent never resets a PCR and never deletes evidence: when a
new boot starts, the old boot's log is set aside (renamed, not removed);
when the PCR and the log disagree within one boot (another writer, a lost
or damaged log), the agent says so and sends what it has, and the verifier
decides. The PCR must be one nobody can reset without a reboot (0-15,
trust/attestation.py), except with a test-only option.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustplane.agent.tpm import Identity, Tpm
from trustplane.api.attestation import Activation, Enrollment, QuoteRequest
from trustplane.atomic import atomic_write, fsync_dir
from trustplane.client import ControlClient
from trustplane.errors import MalformedError
from trustplane.trust.attestation import DEFAULT_PCR, Event, check_measurement_pcr, replay

logger = logging.getLogger("trustplane.agent")
LOG_FILE = "event-log.json"
_FORMAT = 2


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class EventLog:
    """The measurement PCR's event log in one boot of the TPM."""

    path: Path
    pcr: int
    boot: tuple[int, int] | None
    """(resetCount, restartCount) of the boot it belongs to; None: unknown."""
    events: list[Event] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> EventLog | None:
        """The log in `path`; None if there is none; MalformedError if unreadable."""
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise MalformedError(f"{path}: unreadable event log ({exc})") from None
        if isinstance(raw, list):  # written before logs knew their boot
            events = [Event.from_json(item) for item in raw]
            return cls(path, events[0].pcr if events else -1, None, events)
        try:
            boot = (int(raw["boot"]["reset_count"]), int(raw["boot"]["restart_count"]))
            pcr, items = int(raw["pcr"]), raw["events"]
        except (KeyError, TypeError, ValueError):
            raise MalformedError(f"{path}: not an event log") from None
        if raw.get("format") != _FORMAT or not isinstance(items, list):
            raise MalformedError(f"{path}: not an event log of format {_FORMAT}")
        return cls(path, pcr, boot, [Event.from_json(item) for item in items])

    def append(self, event: Event) -> None:
        self.events.append(event)
        self.save()

    def to_json(self) -> list[dict[str, Any]]:
        return [event.to_json() for event in self.events]

    def save(self) -> None:
        if self.boot is None:
            raise MalformedError(f"{self.path}: an event log of an unknown boot is not written")
        document = {
            "format": _FORMAT,
            "pcr": self.pcr,
            "boot": {"reset_count": self.boot[0], "restart_count": self.boot[1]},
            "events": self.to_json(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(document, indent=1).encode(), mode=0o600)


def set_aside(path: Path, tag: str) -> Path:
    """Rename `path` out of the way, next to it; nothing is deleted."""
    target = path.with_name(f"{path.stem}.{tag}{path.suffix}")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.stem}.{tag}.{number}{path.suffix}")
    path.rename(target)
    fsync_dir(path.parent)
    return target


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
    quarantined: bool = False
    """The node gets no keys until an administrator clears it."""


class Attester:
    def __init__(
        self,
        tpm: Tpm,
        state_dir: Path,
        pcr: int = DEFAULT_PCR,
        *,
        allow_resettable_pcr: bool = False,
    ) -> None:
        check_measurement_pcr(pcr, allow_resettable_for_tests=allow_resettable_pcr)
        self.tpm = tpm
        self.pcr = pcr
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log = self._open_log(state_dir / LOG_FILE)

    def _open_log(self, path: Path) -> EventLog:
        """This boot's log: the one on disk if it is this boot's, else a new one."""
        boot = self.tpm.boot().counters
        try:
            log = EventLog.load(path)
        except MalformedError as exc:
            kept = set_aside(path, "unreadable")
            logger.info(
                "%s; kept as %s, and a new log started: the verifier will see it", exc, kept
            )
            log = None
        value = self.tpm.read(self.pcr)
        if log is not None and (log.boot != boot or log.pcr != self.pcr):
            if log.pcr == self.pcr and log.events and replay(log.events).get(self.pcr) == value:
                log.boot = boot  # a TPM restart or resume that kept the PCR: the log goes on
                log.save()
            else:
                tag = "legacy" if log.boot is None else f"boot-{log.boot[0]}-{log.boot[1]}"
                kept = set_aside(path, tag)
                logger.info("a new boot of the TPM: the last boot's event log is kept as %s", kept)
                log = None
        if log is None:
            log = EventLog(path, self.pcr, boot)
            log.save()
        last = log.events[-1] if log.events else None
        if (
            last is not None
            and last.pcr == self.pcr
            and replay(log.events[:-1]).get(self.pcr, bytes(32)) == value
        ):
            # `record` logs before it extends: a crash in between left the
            # last event logged but not extended. Finish that extension.
            logger.info("completing the extension of PCR %d that a crash interrupted", self.pcr)
            self.tpm.extend(last.pcr, bytes.fromhex(last.digest.split(":", 1)[1]))
            value = self.tpm.read(self.pcr)
        if replay(log.events).get(self.pcr, bytes(32)) != value:
            # Never start over: the verifier must see exactly what is here (and
            # its verdict is what the agent and `trustplane run` report).
            logger.info(
                "PCR %d does not match the event log of this boot (%d events); the verifier "
                "will be shown both",
                self.pcr,
                len(log.events),
            )
        return log

    def identity(self) -> Identity:
        return self.tpm.identity()

    def enroll(self, client: ControlClient, transport_key_pem: str) -> None:
        """Register EK and AK, activate the credential, certify the transport key."""
        ident = self.tpm.identity()
        challenge = client.enroll(
            Enrollment.model_construct(
                ek_public=_b64(ident.ek_public),
                ek_certificate=_b64(ident.ek_cert) if ident.ek_cert else None,
                ak_public=_b64(ident.ak_public),
                ak_name=_b64(ident.ak_name),
            )
        )
        secret = self.tpm.activate_credential(
            base64.b64decode(challenge.credential_blob),
            base64.b64decode(challenge.encrypted_secret),
        )
        self.activate(client, secret, transport_key_pem)

    def activate(self, client: ControlClient, secret: bytes, transport_key_pem: str) -> None:
        client.activate(
            Activation.model_construct(
                secret=_b64(secret),
                transport_key=transport_key_pem,
                transport_signature=_b64(self.tpm.sign_external(transport_key_pem.encode())),
            )
        )

    def measure(self, image: str, manifest: str, layers: list[Layer]) -> None:
        """Extend each layer's blob digest and diff_id, logging each first."""
        for layer in layers:
            for kind, digest in (("blob", layer.blob), ("diff_id", layer.diff_id)):
                self.record(Event(self.pcr, digest, image, manifest, layer.index, kind))

    def record(self, event: Event) -> None:
        # Logged before the extension: a crash in between leaves a logged event
        # the next start extends (`_open_log`), never an extension nobody can
        # explain.
        self.log.append(event)
        self.tpm.extend(event.pcr, bytes.fromhex(event.digest.split(":", 1)[1]))

    def quote(self, nonce: bytes) -> QuoteRequest:
        result = self.tpm.quote(nonce, (self.pcr,))
        return QuoteRequest.model_construct(
            nonce=nonce.hex(),
            quote=_b64(result.attest),
            signature=_b64(result.signature),
            event_log=self.log.to_json(),
        )

    def attest(self, client: ControlClient) -> Verdict:
        """One round: nonce, quote, verdict."""
        challenge = client.nonce()
        nonce = bytes.fromhex(challenge.nonce)
        answer = client.quote(self.quote(nonce))
        return Verdict(
            answer.passed, answer.reason, float(challenge.interval_seconds), answer.quarantined
        )
