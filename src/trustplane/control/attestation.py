"""The attestation verifier: enrolment, credential activation, quotes, and
the gate the KMS asks before releasing keys to a node.

1. enrol: the node sends its EK and AK public areas; the verifier checks the
   AK's attributes and Name (and the EK certificate against the vendor CAs
   when configured) and answers MakeCredential(EK, Name(AK), secret).
2. activate: only the TPM holding both keys recovers the secret; the node
   sends it back with its transport key signed by the AK. The AK is then
   bound to the EK, and the transport key to the TPM.
3. quote: against a single-use nonce; signature, AK, nonce, event-log
   replay, and each measured layer against the reference values registered
   with the image. A pass is the node's attested state, for
   `max_age_seconds`; a failure removes it at once.
4. boot record (trust/boot.py): within one boot of the node (the AK's
   resetCount/restartCount unchanged) every event log must extend the one
   accepted before and the TPM clock must not go back; a reboot starts a
   new log.
5. quarantine: a failure that shows the node measured something wrong (a
   layer unlike its reference, an event log that does not explain the PCR,
   tampering with the boot record) is sticky: the node gets no key, across
   agent restarts, PCR resets and reboots, until an administrator clears it
   (`clear`, logged). Failures that say nothing about the node's state (a
   used or expired nonce, a bad signature, a timeout) are not sticky.
6. continuity: nodes read the verifier's `interval_seconds` with every nonce
   and must quote that often; the sweep (`expire_silent`, run by the server
   in the background) turns a pass older than `max_age_seconds` into
   "stale", logged, so a node that goes silent loses its state visibly.
   Nodes dial out (edge gateways sit behind NAT), so the verifier sets the
   pace and enforces it rather than calling in.

Every result goes to the transparency log. Any unexpected error fails.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import delete, select, update

from trustplane.control.db import Database
from trustplane.control.identity import Principal
from trustplane.control.models import Attestation, AttestationNonce, Image
from trustplane.control.policy import Decision
from trustplane.control.settings import AttestationSettings
from trustplane.control.transparency import TransparencyLog
from trustplane.errors import (
    Forbidden,
    IntegrityError,
    MalformedError,
    NotFoundError,
    TrustplaneError,
    UnsupportedError,
    UsageError,
)
from trustplane.trust import tpm
from trustplane.trust.attestation import Event, check_event_log, verify_quote_signature
from trustplane.trust.boot import BootRecord, continue_boot

logger = logging.getLogger("trustplane.attestation")


@dataclass(frozen=True)
class QuoteResult:
    passed: bool
    reason: str
    measured: int
    quarantined: bool = False
    """The node gets no keys until an administrator clears it."""


@dataclass(frozen=True)
class Cleared:
    node: str
    reason: str
    """Why the node had been quarantined."""
    reviewed: int
    """Events of the current boot's log the administrator's clear covers."""
    log_index: int


@dataclass(frozen=True)
class _Outcome:
    """What a quote showed: its failure (and whether it sticks), the boot
    record to keep, the measurements of a pass."""

    failure: str | None = None
    sticky: bool = False
    record: BootRecord | None = None
    measured: tuple[dict[str, object], ...] = ()


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they were stored as UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


@dataclass(frozen=True)
class _Pending:
    ek_public: bytes
    ek_cert: bytes | None
    ak_public: bytes
    ak_name: bytes


def _pending(row: Attestation) -> _Pending | None:
    if row.pending_ek_public is None or row.pending_ak_public is None or not row.pending_ak_name:
        return None
    return _Pending(
        row.pending_ek_public, row.pending_ek_cert, row.pending_ak_public, row.pending_ak_name
    )


def _node(principal: Principal) -> str:
    if principal.kind != "node":
        raise Forbidden("only nodes attest")
    return principal.name


def _boot_record(row: Attestation) -> BootRecord | None:
    if (
        row.boot_reset_count is None
        or row.boot_restart_count is None
        or row.boot_clock is None
        or row.boot_digest is None
        or row.boot_pcrs is None
    ):
        return None
    return BootRecord(
        reset_count=row.boot_reset_count,
        restart_count=row.boot_restart_count,
        clock=row.boot_clock,
        events=row.boot_events,
        digest=row.boot_digest,
        pcrs=tuple(int(pcr) for pcr in row.boot_pcrs),
        reviewed=row.boot_reviewed,
    )


def _store_boot_record(row: Attestation, record: BootRecord | None) -> None:
    row.boot_reset_count = None if record is None else record.reset_count
    row.boot_restart_count = None if record is None else record.restart_count
    row.boot_clock = None if record is None else record.clock
    row.boot_events = 0 if record is None else record.events
    row.boot_digest = None if record is None else record.digest
    row.boot_pcrs = None if record is None else list(record.pcrs)
    row.boot_reviewed = 0 if record is None else record.reviewed


def _quarantine_note(node: str, reason: str | None = None) -> str:
    why = f" ({reason})" if reason else ""
    return (
        f"node {node} is quarantined{why}; an administrator must clear it "
        f"(trustplane node clear {node} --reason ...)"
    )


class Verifier:
    def __init__(self, db: Database, log: TransparencyLog, settings: AttestationSettings) -> None:
        self.db = db
        self.log = log
        self.settings = settings
        self._cas: list[x509.Certificate] = []
        for path in settings.ek_ca_files:
            try:
                self._cas.extend(x509.load_pem_x509_certificates(path.read_bytes()))
            except (OSError, ValueError) as exc:
                raise UsageError(f"attestation.ek_ca_files: {path}: {exc}") from None

    # -- enrolment ---------------------------------------------------------------

    def enroll(
        self,
        principal: Principal,
        ek_public: bytes,
        ek_cert: bytes | None,
        ak_public: bytes,
        ak_name: bytes,
    ) -> tpm.Credential:
        node = _node(principal)
        try:
            ek = tpm.parse_public(ek_public)
            tpm.check_ek(ek)
            ak = tpm.parse_public(ak_public)
            tpm.check_ak(ak)
            if not hmac.compare_digest(ak.name, ak_name):
                raise IntegrityError("the AK name does not match its public area")
            ak.public_key()
            self._check_ek_cert(ek, ek_cert)
            self._check_same_tpm(node, ek_public)
            secret = os.urandom(32)
            credential = tpm.make_credential(ek, ak.name, secret)
        except TrustplaneError as exc:
            self._record(node, "attestation.enroll", False, str(exc))
            if isinstance(exc, UnsupportedError):
                raise MalformedError(str(exc)) from None
            raise
        except Exception as exc:  # an unusable key (cryptography refuses it): fail
            reason = f"unusable EK or AK ({type(exc).__name__})"
            self._record(node, "attestation.enroll", False, reason)
            raise MalformedError(reason) from None
        with self.db.write_session() as session:
            row = session.get(Attestation, node)
            if row is None:
                row = Attestation(
                    node=node,
                    ek_public=ek_public,
                    ek_cert=ek_cert,
                    ak_public=ak_public,
                    ak_name=ak.name,
                    bound=False,
                    measurements=[],
                )
                session.add(row)
            # The enrolment waits beside the current binding: only activation
            # (the TPM itself answering) replaces it, so a re-enrolment made
            # with a stolen node key cannot take the node's state away.
            row.pending_ek_public, row.pending_ek_cert = ek_public, ek_cert
            row.pending_ak_public, row.pending_ak_name = ak_public, ak.name
            row.challenge_hash = hashlib.sha256(secret).digest()
            row.challenge_expires = _now() + timedelta(seconds=self.settings.challenge_ttl_seconds)
        self._record(node, "attestation.enroll", True, "credential issued", ak=ak.name.hex())
        return credential

    def _check_same_tpm(self, node: str, ek_public: bytes) -> None:
        """A node bound to one TPM cannot move to another by re-enrolling (a
        stolen node key must not bring its own TPM); an administrator resets it."""
        with self.db.session() as session:
            row = session.get(Attestation, node)
        if row is not None and row.bound and not hmac.compare_digest(row.ek_public, ek_public):
            raise IntegrityError(f"node {node} is bound to another TPM (EK); ask an admin to reset")

    def _check_ek_cert(self, ek: tpm.PublicArea, cert_der: bytes | None) -> None:
        if not self._cas:
            return
        if cert_der is None:
            raise IntegrityError("an EK certificate from a configured vendor CA is required")
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError:
            raise MalformedError("the EK certificate is not DER X.509") from None
        for ca in self._cas:
            try:
                cert.verify_directly_issued_by(ca)
            except Exception:  # noqa: S112 - not this CA (signature, key type): next
                continue
            break
        else:
            raise IntegrityError("the EK certificate is not issued by a configured vendor CA")
        now = _now()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise IntegrityError("the EK certificate is not valid now")
        spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*spki) != ek.public_key().public_bytes(*spki):
            raise IntegrityError("the EK certificate is for another key")

    def activate(
        self, principal: Principal, secret: bytes, transport_key: str, signature: bytes
    ) -> None:
        node = _node(principal)
        with self.db.write_session() as session:
            row = session.get(Attestation, node)
            pending = None if row is None else _pending(row)
            if row is None or row.challenge_hash is None or pending is None:
                raise NotFoundError(f"node {node} has no pending enrolment")
            expires = _aware(row.challenge_expires)
            reason = ""
            if expires is None or expires < _now():
                reason = "the enrolment challenge expired"
            elif not hmac.compare_digest(hashlib.sha256(secret).digest(), row.challenge_hash):
                reason = "wrong credential: the AK is not bound to the EK"
            else:
                try:
                    ak = tpm.parse_public(pending.ak_public)
                    tpm.verify_signature(ak, transport_key.encode(), signature)
                except Exception as exc:  # fail closed
                    why = str(exc) if isinstance(exc, TrustplaneError) else type(exc).__name__
                    reason = f"transport key not certified by the AK: {why}"
            if not reason:
                # The new binding starts over: nothing measured under the old AK
                # counts. The boot record stays for the same AK (re-enrolling
                # must not wipe it); the quarantine stays in every case.
                if not hmac.compare_digest(row.ak_name, pending.ak_name):
                    _store_boot_record(row, None)
                row.ek_public, row.ek_cert = pending.ek_public, pending.ek_cert
                row.ak_public, row.ak_name = pending.ak_public, pending.ak_name
                row.bound, row.bound_at, row.transport_key = True, _now(), transport_key
                row.last_result, row.last_reason, row.last_at = None, None, None
                row.measurements = []
            row.challenge_hash, row.challenge_expires = None, None
            row.pending_ek_public, row.pending_ek_cert = None, None
            row.pending_ak_public, row.pending_ak_name = None, None
        if reason:
            self._record(node, "attestation.activate", False, reason)
            raise Forbidden(reason)
        self._record(
            node,
            "attestation.activate",
            True,
            "AK bound to EK; transport key certified",
            transport_key=hashlib.sha256(transport_key.encode()).hexdigest(),
        )

    # -- quotes --------------------------------------------------------------------

    def nonce(self, principal: Principal) -> bytes:
        node = _node(principal)
        value = os.urandom(32)
        now = _now()
        with self.db.session() as session:
            session.execute(delete(AttestationNonce).where(AttestationNonce.expires < now))
            session.add(
                AttestationNonce(
                    nonce=value.hex(),
                    node=node,
                    expires=now + timedelta(seconds=self.settings.nonce_ttl_seconds),
                )
            )
        return value

    def quote(
        self,
        principal: Principal,
        nonce: bytes,
        attest: bytes,
        signature: bytes,
        events: list[dict[str, Any]],
    ) -> QuoteResult:
        node = _node(principal)
        try:
            outcome, seen = self._check_quote(node, nonce, attest, signature, events)
        except TrustplaneError as exc:
            outcome, seen = _Outcome(failure=str(exc)), None
        except Exception as exc:  # fail closed
            logger.error("quote verification error for %s: %s", node, type(exc).__name__)
            outcome, seen = _Outcome(failure=f"verification error ({type(exc).__name__})"), None
        reason = outcome.failure or f"quote verified; {len(outcome.measured)} measurements match"
        quarantine: str | None = None
        with self.db.write_session() as session:
            row = session.get(Attestation, node)
            if row is not None:
                if outcome.record is not None:
                    if _boot_record(row) != seen:
                        # Another quote of this node was recorded meanwhile: this
                        # one was checked against a record that is gone.
                        outcome = _Outcome(failure="a concurrent quote changed the boot record")
                        reason = outcome.failure or ""
                    else:
                        _store_boot_record(row, outcome.record)
                if outcome.sticky and row.quarantine_reason is None:
                    row.quarantine_reason, row.quarantined_at = reason, _now()
                quarantine = row.quarantine_reason
                passed = outcome.failure is None and quarantine is None
                if quarantine is not None and outcome.failure is None:
                    reason = f"{reason}, but {_quarantine_note(node, quarantine)}"
                elif quarantine is not None:
                    reason = f"{reason}; {_quarantine_note(node)}"
                row.last_result = "pass" if passed else "fail"
                row.last_reason = reason
                row.last_at = _now()
                row.measurements = list(outcome.measured) if passed else []
        passed = outcome.failure is None and quarantine is None
        extra: dict[str, Any] = {"measured": len(outcome.measured) if passed else 0}
        if quarantine is not None:
            extra["quarantined"] = True
        self._record(node, "attestation.quote", passed, reason, **extra)
        return QuoteResult(passed, reason, extra["measured"], quarantine is not None)

    def _check_quote(
        self,
        node: str,
        nonce: bytes,
        attest: bytes,
        signature: bytes,
        raw_events: list[dict[str, Any]],
    ) -> tuple[_Outcome, BootRecord | None]:
        """Check a quote; an error raised here is a failure that does not stick.

        Returns the outcome and the boot record it was checked against.
        """
        # The nonce is consumed first, whatever happens next: single use.
        with self.db.session() as session:
            consumed = session.execute(
                delete(AttestationNonce).where(
                    AttestationNonce.nonce == nonce.hex(),
                    AttestationNonce.node == node,
                    AttestationNonce.expires >= _now(),
                )
            ).rowcount  # type: ignore[attr-defined]
            row = session.get(Attestation, node)
        if not consumed:
            raise IntegrityError("unknown, expired or already used nonce (replayed quote?)")
        if row is None or not row.bound:
            raise IntegrityError("the node's AK is not bound to its EK (no credential activation)")
        pcrs = tuple(self.settings.pcrs)
        signed = verify_quote_signature(row.ak_public, attest, signature, nonce, pcrs)
        # From here on the quote is the node's TPM speaking, now: what it and
        # its log show is the node's own evidence, and a failure sticks.
        seen = _boot_record(row)
        try:
            events = [Event.from_json(raw) for raw in raw_events]
        except TrustplaneError as exc:
            return _Outcome(failure=f"the event log is unusable: {exc}", sticky=True), seen
        try:
            record = continue_boot(seen, signed.quote, events, pcrs)
        except TrustplaneError as exc:
            return _Outcome(failure=str(exc), sticky=True), seen
        try:
            check_event_log(signed, events, pcrs)
        except TrustplaneError as exc:
            return _Outcome(failure=str(exc), sticky=True), seen
        # The log is proven: it is the boot's record now, mismatches included.
        measured, mismatch = self._check_references(events, record.reviewed)
        if mismatch is not None:
            return _Outcome(failure=mismatch, sticky=True, record=record), seen
        return _Outcome(record=record, measured=tuple(measured)), seen

    def _check_references(
        self, events: list[Event], reviewed: int
    ) -> tuple[list[dict[str, object]], str | None]:
        """Every measured layer must equal what the publisher registered.

        Returns the measurements and the first mismatch. The first `reviewed`
        events were reviewed by an administrator who cleared the node: a
        mismatch among them is not counted again, nor as a measurement.
        """
        images: dict[tuple[str, str], dict[int, dict[str, object]] | None] = {}
        measured: list[dict[str, object]] = []
        for position, event in enumerate(events):
            key = (event.image, event.manifest)
            if key not in images:
                with self.db.session() as session:
                    image = session.scalar(
                        select(Image).where(
                            Image.repository == event.image,
                            Image.manifest_digest == event.manifest,
                        )
                    )
                images[key] = (
                    None
                    if image is None
                    else {int(str(layer["index"])): layer for layer in image.layers}
                )
            layers = images[key]
            mismatch = None
            if layers is None:
                mismatch = f"measured image {event.image}@{event.manifest} is not registered"
            else:
                reference = layers.get(event.layer)
                want = None
                if reference is not None:
                    want = reference.get("digest" if event.kind == "blob" else "diff_id")
                if want != event.digest:
                    mismatch = (
                        f"layer {event.layer} of {event.image} measured {event.kind} "
                        f"{event.digest}, reference {want}"
                    )
            if mismatch is not None:
                if position < reviewed:
                    continue
                return measured, mismatch
            measured.append(
                {
                    "image": event.image,
                    "manifest": event.manifest,
                    "layer": event.layer,
                    "kind": event.kind,
                    "digest": event.digest,
                }
            )
        return measured, None

    # -- quarantine --------------------------------------------------------------------

    def clear(self, principal: Principal, node: str, reason: str) -> Cleared:
        """An administrator lets a quarantined node attest again (logged).

        The clear covers the event log this boot has shown so far: its
        events were reviewed, so a mismatch among them no longer counts; a
        log that does not explain the PCR, or that lost evidence, still
        fails until the node reboots.
        """
        if principal.kind != "user" or principal.role != "admin":
            raise Forbidden(f"{principal.subject} may not clear node {node}: administrators only")
        reason = reason.strip()
        if len(reason) < 3:
            raise UsageError("a clear needs a reason (--reason), for the log")
        with self.db.write_session() as session:
            row = session.get(Attestation, node)
            if row is None:
                raise NotFoundError(f"node {node} has never enrolled a TPM")
            quarantine = row.quarantine_reason
            if quarantine is None:
                raise UsageError(f"node {node} is not quarantined")
            row.quarantine_reason, row.quarantined_at = None, None
            row.boot_reviewed = row.boot_events
            reviewed = row.boot_events
        receipt = self.log.append(
            "attestation.clear",
            {
                "subject": f"node:{node}",
                "result": "cleared",
                "by": principal.subject,
                "reason": reason,
                "quarantine": quarantine,
                "reviewed_events": reviewed,
            },
        )
        return Cleared(node, quarantine, reviewed, receipt.index)

    # -- continuity ------------------------------------------------------------------

    def expire_silent(self) -> list[str]:
        """Mark every pass older than `max_age_seconds` stale, and log each.

        The update is conditional, so several server workers or replicas
        sweeping at once expire (and log) each node once.
        """
        cutoff = _now() - timedelta(seconds=self.settings.max_age_seconds)
        silent = (Attestation.last_result == "pass", Attestation.last_at < cutoff)
        with self.db.session() as session:
            candidates = list(session.scalars(select(Attestation.node).where(*silent)))
        expired: list[str] = []
        reason = f"no passing quote for {self.settings.max_age_seconds} s (node silent)"
        for node in candidates:
            with self.db.session() as session:
                changed = session.execute(
                    update(Attestation)
                    .where(Attestation.node == node, *silent)
                    .values(last_result="stale", last_reason=reason)
                ).rowcount  # type: ignore[attr-defined]
            if changed:
                expired.append(node)
                self._record(node, "attestation.expire", False, reason)
        return expired

    # -- the gate --------------------------------------------------------------------

    def certified_transport_key(self, node: str) -> str | None:
        """The transport key PEM node `node`'s TPM certified (None: never enrolled)."""
        with self.db.session() as session:
            row = session.get(Attestation, node)
            return row.transport_key if row is not None and row.bound else None

    def gate(
        self,
        principal: Principal,
        repository: str | None,
        layer: int | None,
        transport_key: str | None,
    ) -> Decision:
        """May this node receive keys (for this layer of this image)? Fails closed."""
        try:
            return self._gate(principal, repository, layer, transport_key)
        except Exception as exc:
            logger.error("attestation gate error: %s", type(exc).__name__)
            return Decision(False, f"attestation check failed ({type(exc).__name__})")

    def _gate(
        self,
        principal: Principal,
        repository: str | None,
        layer: int | None,
        transport_key: str | None,
    ) -> Decision:
        if principal.kind != "node":
            return Decision(False, "attestation required: only attested nodes receive this key")
        with self.db.session() as session:
            row = session.get(Attestation, principal.name)
        if row is None or not row.bound:
            return Decision(False, "attestation required: the node's AK is not bound to its EK")
        if row.quarantine_reason is not None:
            return Decision(
                False,
                "attestation required: " + _quarantine_note(principal.name, row.quarantine_reason),
            )
        if row.last_result == "stale":
            return Decision(False, "attestation required: the last attestation is stale (silent)")
        if row.last_result != "pass":
            why = row.last_reason or "never attested"
            return Decision(False, f"attestation required: last attestation failed ({why})")
        last = _aware(row.last_at)
        if last is None or _now() - last > timedelta(seconds=self.settings.max_age_seconds):
            return Decision(False, "attestation required: the last attestation is stale")
        if transport_key is not None and not (
            row.transport_key is not None
            and hmac.compare_digest(row.transport_key.encode(), transport_key.encode())
        ):
            return Decision(False, "attestation required: transport key not certified by the TPM")
        if repository is not None and layer is not None:
            measured = {
                int(str(m["layer"]))
                for m in row.measurements
                if m.get("image") == repository and m.get("kind") == "diff_id"
            }
            missing = [i for i in range(layer + 1) if i not in measured]
            if missing:
                return Decision(
                    False,
                    f"attestation required: layers {missing} of {repository} not measured",
                )
        return Decision(True, "node attested")

    def _record(self, node: str, kind: str, passed: bool, reason: str, **extra: Any) -> None:
        entry: dict[str, Any] = {
            "subject": f"node:{node}",
            "result": "pass" if passed else "fail",
            "reason": reason,
        }
        entry.update(extra)
        self.log.append(kind, entry)
