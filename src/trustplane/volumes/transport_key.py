"""The key pair a node has volume keys wrapped to, held in memory.

The node agent keeps the transport key its TPM certified at enrolment in its
state directory (`transport.pem`, 0600, and `transport.pub.pem`; see
agent/service.py). An attach sends the public half and opens the JWE
answer in memory with the private half (`VolumeKeyRelease.key_bytes`). A
node without an agent state uses a throw-away pair made for the one attach:
the answer still opens only in this process, but the control plane cannot
tell that key from a thief's (README: encrypted volumes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trustplane.api.volumes import VolumeKeyRelease
from trustplane.crypto.keys import UnwrapKey, generate_key_pair, load_unwrap_key
from trustplane.errors import UsageError

PRIVATE_FILE = "transport.pem"
PUBLIC_FILE = "transport.pub.pem"


@dataclass(frozen=True)
class NodeTransport:
    public_pem: str
    private: UnwrapKey = field(repr=False)

    @classmethod
    def ephemeral(cls) -> NodeTransport:
        private, public = generate_key_pair("ec-p256")
        return cls(public.decode(), load_unwrap_key(private, "transport key"))

    @classmethod
    def of_node(cls, state_dir: Path | None) -> NodeTransport:
        """The agent's certified pair in `state_dir` if it holds one, else a throw-away pair."""
        if state_dir is None:
            return cls.ephemeral()
        private_path, public_path = state_dir / PRIVATE_FILE, state_dir / PUBLIC_FILE
        if not private_path.exists() and not public_path.exists():
            return cls.ephemeral()
        try:
            private = private_path.read_bytes()
            public = public_path.read_text()
        except OSError as exc:
            raise UsageError(f"the transport key in {state_dir}: {exc.strerror}") from None
        return cls(public, load_unwrap_key(private, f"{private_path}"))

    def open(self, release: VolumeKeyRelease) -> bytes:
        """The volume key of `release`, unwrapped in memory."""
        return release.key_bytes(self.private)
