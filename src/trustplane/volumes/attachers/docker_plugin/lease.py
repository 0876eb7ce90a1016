"""The key lease: a released volume key kept in memory, for a control-plane outage.

Off by default. With `--key-lease SECONDS` (at most MAX_KEY_LEASE), each
key the control plane releases to this node for a mount is kept in the
plugin's memory (never on disk, never in the state file) until SECONDS
after its release. It is used for exactly one thing: opening that same
volume again on this node while the control plane cannot be reached at all
(no answer: connection refused, reset, timed out). An answer from the
control plane always wins: a refusal (policy, attestation, the volume or
its key gone) is passed on and ends the lease of that volume at once, so a
later outage cannot bring the key back. The lease ends at its expiry (the
plugin's tender sweeps it), when the volume is removed, and when the
plugin stops.

While a key is leased the volume stays attached to this node in the
control plane even when no container uses it (the driver detaches it when
the lease ends), so no other node gets the key while this one may still
open the volume on its own: the control plane's one-node-at-a-time rule
holds through an outage.

Every use is logged in the plugin's log and kept (volume, time, when the
key was released) until the control plane answers again; the driver then
reports it (`volume.lease` entries in the transparency log, through
`POST /v1/reports`).

What it does not protect against: a policy change or key destruction made
while this node cannot reach the control plane takes effect here only when
it is reachable again or the lease ends; a key in process memory is
readable by root on this node (as it is while a volume is open, in the
daemon that holds it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from trustplane.errors import UsageError
from trustplane.volumes.attachers.docker_plugin.service import AttachMaterial

log = logging.getLogger("trustplane.volumes.plugin")

MAX_KEY_LEASE = 3600.0
"""The longest a key may be kept (seconds): an outage longer than this opens nothing new."""


@dataclass(frozen=True)
class LeaseUse:
    """One open made with a leased key (wall-clock Unix seconds)."""

    volume: str
    time: float
    released: float
    expires: float


@dataclass
class _Held:
    material: AttachMaterial
    released: float
    """Wall clock, for the log and the report."""
    deadline: float
    """`clock()` time at which the lease ends."""


class KeyLease:
    """Keys released for mounts, each kept `seconds` at most; thread-safe."""

    def __init__(
        self,
        seconds: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < seconds <= MAX_KEY_LEASE:
            raise UsageError(
                f"--key-lease {seconds:g}: a key lease lasts more than 0 and at most "
                f"{MAX_KEY_LEASE:g} seconds"
            )
        self.seconds = seconds
        self._clock = clock
        self._wall = wall
        self._held: dict[str, _Held] = {}
        self._uses: list[LeaseUse] = []
        self._lock = threading.Lock()

    def keep(self, material: AttachMaterial) -> None:
        """The control plane just released this key: keep it `seconds` from now."""
        with self._lock:
            self._held[material.name] = _Held(material, self._wall(), self._clock() + self.seconds)

    def holds(self, name: str) -> bool:
        """A live lease for `name` (expired ones are forgotten first)."""
        self.sweep()
        with self._lock:
            return name in self._held

    def use(self, name: str) -> AttachMaterial | None:
        """The leased key of `name` for an open while the control plane is unreachable
        (the use is logged and kept for the report), or None: no live lease."""
        self.sweep()
        with self._lock:
            held = self._held.get(name)
            if held is None:
                return None
            now = self._wall()
            expires = now + max(0.0, held.deadline - self._clock())
            self._uses.append(LeaseUse(name, now, held.released, expires))
        log.warning(
            "volume %s: the control plane cannot be reached; opening it with the key it released "
            "at %s, kept by the key lease until %s (reported once it answers)",
            name, _stamp(held.released), _stamp(expires),
        )  # fmt: skip
        return held.material

    def forget(self, name: str, why: str) -> None:
        with self._lock:
            gone = self._held.pop(name, None)
        if gone is not None:
            log.info("volume %s: key lease ended (%s)", name, why)

    def sweep(self) -> None:
        """Forget every key whose lease has ended."""
        now = self._clock()
        with self._lock:
            ended = [name for name, held in self._held.items() if held.deadline <= now]
            for name in ended:
                del self._held[name]
        for name in ended:
            log.info("volume %s: key lease ended (expired)", name)

    def clear(self) -> None:
        """Forget every key (the plugin stops)."""
        with self._lock:
            names = sorted(self._held)
            self._held.clear()
        if names:
            log.info("key leases ended (plugin stop): %s", ", ".join(names))

    def uses(self) -> list[LeaseUse]:
        """Uses not reported yet (oldest first)."""
        with self._lock:
            return list(self._uses)

    def reported(self, uses: list[LeaseUse]) -> None:
        """These uses are in the control plane's log now."""
        with self._lock:
            self._uses = [u for u in self._uses if u not in uses]


def _stamp(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
