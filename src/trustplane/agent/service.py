"""The long-running node agent: enrol the TPM once, then attest on an interval.

State directory (mode 0700): `transport.pem` (the transport private key,
0600), `enrolment.json` (which AK was bound), `event-log.json` (this boot's
measurements; earlier boots' logs are kept beside it as
`event-log.boot-R-S.json`), `tpm.lock` (whose turn it is to use the TPM; see
tpm_lock.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trustplane.agent.attester import Attester, Verdict
from trustplane.agent.runtime import ContainerCheck, RuntimeIntegrity
from trustplane.agent.tpm import Tpm
from trustplane.agent.tpm_lock import node_tpm
from trustplane.atomic import atomic_write
from trustplane.client import ControlClient, connect_as_node
from trustplane.crypto.keys import generate_key_pair
from trustplane.crypto.node_assertion import load_node_key
from trustplane.errors import TrustplaneError, UsageError
from trustplane.trust.attestation import DEFAULT_PCR, check_measurement_pcr

logger = logging.getLogger("trustplane.agent")
RuntimeReport = Callable[[list[ContainerCheck]], None]


@dataclass(frozen=True)
class AgentConfig:
    server_url: str
    tcti: str
    node: str
    node_key: Path
    state_dir: Path
    ca_file: Path | None = None
    pcr: int = DEFAULT_PCR
    allow_resettable_pcr: bool = False
    """TESTS ONLY: accept PCR 16 or 23, which any root user can reset."""
    interval: float = 60.0
    audience: str | None = None
    docker_url: str | None = None
    """Engine API of this node's dockerd; None turns runtime integrity off."""
    runtime_interval: float = 60.0
    """Seconds between re-measurements of running containers."""


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        check_measurement_pcr(config.pcr, allow_resettable_for_tests=config.allow_resettable_pcr)
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            pem = config.node_key.read_bytes()
        except OSError as exc:
            raise UsageError(f"--node-key {config.node_key}: {exc.strerror}") from None
        self._signing = load_node_key(pem, f"--node-key {config.node_key}")
        self.transport_public = self._transport_key()
        self.runtime = RuntimeIntegrity(config.docker_url) if config.docker_url else None
        self._next_runtime = 0.0

    def _transport_key(self) -> str:
        private_path = self.config.state_dir / "transport.pem"
        public_path = self.config.state_dir / "transport.pub.pem"
        if not private_path.exists() or not public_path.exists():
            private, public = generate_key_pair("ec-p256")
            atomic_write(private_path, private, mode=0o600)
            atomic_write(public_path, public, mode=0o644)
        return public_path.read_text()

    def client(self) -> ControlClient:
        """A client logged in as the node (a fresh single-use assertion)."""
        return connect_as_node(
            self.config.server_url,
            self.config.node,
            self._signing,
            self.config.ca_file,
            self.config.audience,
        )

    def attester(self, tpm: Tpm) -> Attester:
        """The attester for this node's state directory and PCR, on `tpm`."""
        return Attester(
            tpm,
            self.config.state_dir,
            self.config.pcr,
            allow_resettable_pcr=self.config.allow_resettable_pcr,
        )

    def enrolled(self, tpm: Tpm) -> bool:
        path = self.config.state_dir / "enrolment.json"
        if not path.exists():
            return False
        recorded = json.loads(path.read_text())
        return bool(recorded.get("ak_name") == tpm.identity().ak_name.hex())

    def enroll(self, tpm: Tpm, attester: Attester, client: ControlClient) -> None:
        attester.enroll(client, self.transport_public)
        record = {"ak_name": tpm.identity().ak_name.hex(), "server": self.config.server_url}
        atomic_write(self.config.state_dir / "enrolment.json", json.dumps(record).encode())

    def _pause(self, verdict: Verdict | None) -> float:
        """The configured interval, shortened to the verifier's when it asks for more."""
        if verdict is not None and verdict.interval is not None and verdict.interval > 0:
            return min(self.config.interval, verdict.interval)
        return self.config.interval

    def runtime_round(self, report: RuntimeReport | None = None) -> list[ContainerCheck]:
        """Re-measure the running containers once (no TPM involved); a failed
        round is logged and retried at the next one."""
        if self.runtime is None:
            return []
        self._next_runtime = time.monotonic() + self.config.runtime_interval
        try:
            with self.client() as client:
                results = self.runtime.check(client)
        except TrustplaneError as exc:
            logger.error("runtime integrity round failed: %s", exc)
            results = []
        if report is not None:
            report(results)
        return results

    def _idle(self, seconds: float, report: RuntimeReport | None) -> None:
        """Wait `seconds`, re-measuring containers whenever their interval comes round."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.runtime is not None and time.monotonic() >= self._next_runtime:
                self.runtime_round(report)
                continue
            wake = self._next_runtime if self.runtime is not None else deadline
            time.sleep(max(0.0, min(left, wake - time.monotonic())))

    def run(
        self,
        rounds: int | None = None,
        report: Callable[[Verdict], None] | None = None,
        runtime_report: RuntimeReport | None = None,
    ) -> Verdict | None:
        """Enrol if needed, then attest every `interval` seconds (`rounds` times,
        or forever). A failed round is reported and retried at the next one."""
        verdict: Verdict | None = None
        done = 0
        while rounds is None or done < rounds:
            if done:
                self._idle(self._pause(verdict), runtime_report)
            done += 1
            # The TPM is opened per round, under the node's TPM lock, so that
            # `trustplane run` can measure and attest in between (tpm_lock.py).
            # A TPM that cannot be opened is an error, not a failed round.
            with node_tpm(self.config.tcti, self.config.state_dir) as tpm:
                attester = self.attester(tpm)
                try:
                    with self.client() as client:
                        if not self.enrolled(tpm):
                            self.enroll(tpm, attester, client)
                        verdict = attester.attest(client)
                except TrustplaneError as exc:
                    verdict = Verdict(False, str(exc))
            if report is not None:
                report(verdict)
            if self.runtime is not None and time.monotonic() >= self._next_runtime:
                self.runtime_round(runtime_report)
        return verdict
