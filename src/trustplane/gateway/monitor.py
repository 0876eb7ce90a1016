"""The resource monitor: containers started through the gateway, watched until they end.

After a start the gateway forwarded (or a start commanded over MQTT), the
container is watched: every `interval` seconds its CPU and memory share is
measured,

- CPU: CPU time used since the last sample over the wall time times the
  host's CPUs (100 % = every CPU of the host busy);
- memory: the memory in use (without reclaimable page cache, as `docker
  stats` counts it) over the container's memory limit, or over the host's
  memory when it has no limit below that;

from the container's cgroup files (cgroup v2 `cpu.stat`/`memory.current`,
or v1 `cpuacct.usage`/`memory.usage_in_bytes`, found from
`/proc/PID/cgroup` of the container's init process), or from the Engine
stats API when they cannot be read (another PID namespace, another mount).

When a share stays above its threshold for `sustain` seconds, the most
recently started of the offending containers is stopped, through dockerd
itself (not through the proxy), and the measurement and the action are
reported to the control plane (`gateway.monitor`). One container is
stopped per sample; the next sample decides about the others again.

Only containers started through this gateway are watched: others on the
same dockerd are not the gateway's to stop.

`source` chooses where samples come from: `auto` (cgroup files, else the
stats API), `cgroup` or `stats` only. A monitor that cannot sample is
blind, and says so instead of going quiet: a round fails when a watched,
still running container cannot be sampled, or, with nothing watched, when
none of its sources answers (the cgroup root unreadable, dockerd not
answering). After BLIND_AFTER failed rounds in a row the monitor is blind:
it reports `gateway.status` ("monitor blind", with the reason) once, shows
it on the gateway's health, keeps watching what it watched, and new
container starts are refused (`refuse_start_if_blind`) unless the gateway
allows them (`allow_blind`). The first round that samples again reports
"monitor recovered" and starts pass again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from trustplane.errors import TrustplaneError, UnavailableError, UsageError
from trustplane.gateway import defaults
from trustplane.gateway.docker_api import DockerApi
from trustplane.gateway.reporter import Reporter

log = logging.getLogger("trustplane.gateway")
CGROUP_ROOT = defaults.CGROUP_ROOT
UNLIMITED = 1 << 60
"""cgroup v1 writes "no limit" as a number near 2**63."""
BLIND_AFTER = 3
"""Failed rounds in a row after which the monitor is blind (one is a hiccup)."""
Source = Literal["auto", "cgroup", "stats"]
SOURCES: tuple[Source, ...] = ("auto", "cgroup", "stats")


def check_source(name: str) -> Source:
    """A monitor source named on the command line or in a file; UsageError otherwise."""
    for source in SOURCES:
        if name == source:
            return source
    raise UsageError(f"unknown monitor source {name!r}; known: {', '.join(SOURCES)}")


@dataclass(frozen=True)
class Thresholds:
    cpu_percent: float = defaults.CPU_THRESHOLD
    """Share of the host's CPU capacity."""
    memory_percent: float = defaults.MEMORY_THRESHOLD
    """Share of the container's memory limit (or of the host's memory without one)."""
    sustain: float = defaults.SUSTAIN
    """Seconds a share must stay above its threshold before the container is stopped."""
    interval: float = defaults.MONITOR_INTERVAL
    """Seconds between samples."""

    def __post_init__(self) -> None:
        if not 0 < self.cpu_percent <= 100 or not 0 < self.memory_percent <= 100:
            raise UsageError("resource thresholds are percentages in (0, 100]")
        if not 0 <= self.sustain <= 86400 or not 0.05 <= self.interval <= 3600:
            raise UsageError("sustain must be 0-86400 s and the interval 0.05-3600 s")

    def updated(self, changes: dict[str, Any]) -> Thresholds:
        """A copy with `changes` (names as above, numbers); UsageError for anything else."""
        known = {"cpu_percent", "memory_percent", "sustain", "interval"}
        if not changes or set(changes) - known:
            raise UsageError(f"threshold updates name some of {sorted(known)}")
        values: dict[str, float] = {}
        for key, value in changes.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UsageError(f"threshold {key} must be a number")
            values[key] = float(value)
        return replace(self, **values)


@dataclass(frozen=True)
class Sample:
    cpu_ns: int
    """Cumulative CPU time of the container (ns), or of the stats API's counter."""
    system_ns: int
    """Wall time times host CPUs (ns) for the cgroup source; system_cpu_usage for stats."""
    memory: int
    limit: int
    source: str


@dataclass
class Watched:
    container_id: str
    name: str
    image: str
    started: float
    pid: int = 0
    cgroup: tuple[Path, Path, bool] | None = None
    """(cpu dir, memory dir, is v2) once found; None: use the stats API."""
    previous: Sample | None = None
    over_since: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    failure: str = ""
    """Why the last sample could not be taken."""


class ResourceMonitor:
    def __init__(
        self,
        docker: DockerApi,
        thresholds: Thresholds,
        reporter: Reporter | None = None,
        cgroup_root: Path = CGROUP_ROOT,
        source: Source = defaults.MONITOR_SOURCE,
        allow_blind: bool = False,
    ) -> None:
        self.docker = docker
        self.thresholds = thresholds
        self.reporter = reporter
        self.cgroup_root = cgroup_root
        self.source = source
        self.allow_blind = allow_blind
        """Let containers start while the monitor is blind (refused by default)."""
        self.blind: str | None = None
        """Why the monitor cannot sample, while it cannot; None when it can."""
        self.blind_since: float | None = None
        self._failed_rounds = 0
        self.watched: dict[str, Watched] = {}
        self.stopped: list[dict[str, Any]] = []
        """What the monitor stopped, newest last (for status reports and tests)."""
        self._cpus = len(os.sched_getaffinity(0)) or 1
        self._host_memory = _host_memory()
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        for task in [self._task, *self._pending]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = None

    def watch(self, name: str) -> None:
        """Watch a container that was just started (looked up in the background).

        Its start time is taken now: the background lookups may finish in any
        order, and "most recently started" must follow the starts.
        """
        task = asyncio.create_task(self._add(name, time.time()))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def looked_up(self) -> None:
        """Wait until the lookups of the containers `watch()` was given so far are done.

        For tests: a lookup is an inspect on dockerd, which under load can take
        longer than any fixed wait.
        """
        await asyncio.gather(*self._pending, return_exceptions=True)

    async def _add(self, name: str, started: float) -> None:
        try:
            container = await self.docker.inspect("containers", name)
        except TrustplaneError as exc:
            log.warning("monitor: cannot inspect %s: %s", name, exc)
            return
        if container is None:
            return
        state = container.get("State")
        if not isinstance(state, dict) or not state.get("Running"):
            return
        container_id = str(container.get("Id", ""))
        config = container.get("Config")
        watched = Watched(
            container_id=container_id,
            name=str(container.get("Name", "")).lstrip("/"),
            image=str(config.get("Image", "")) if isinstance(config, dict) else "",
            started=started,
            pid=int(state.get("Pid") or 0),
        )
        watched.cgroup = self._find_cgroup(watched.pid) if self.source != "stats" else None
        self.watched[container_id] = watched
        log.info("monitor: watching %s (%s)", watched.name, "cgroup" if watched.cgroup else "stats")

    # -- measuring -------------------------------------------------------------------

    def _find_cgroup(self, pid: int) -> tuple[Path, Path, bool] | None:
        """The container's cgroup directories from /proc/PID/cgroup, or None."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        v2 = (self.cgroup_root / "cgroup.controllers").exists()
        cpu: Path | None = None
        memory: Path | None = None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            relative = path.lstrip("/")
            if v2 and controllers == "":
                directory = self.cgroup_root / relative
                if (directory / "memory.current").exists() and (directory / "cpu.stat").exists():
                    return directory, directory, True
            names = controllers.split(",")
            if "cpuacct" in names:
                for mount in (controllers, "cpuacct", "cpu,cpuacct"):
                    candidate = self.cgroup_root / mount / relative
                    if (candidate / "cpuacct.usage").exists():
                        cpu = candidate
                        break
            if "memory" in names:
                candidate = self.cgroup_root / "memory" / relative
                if (candidate / "memory.usage_in_bytes").exists():
                    memory = candidate
        if cpu is None or memory is None:
            return None
        return cpu, memory, False

    def _read_cgroup(self, watched: Watched) -> Sample | None:
        assert watched.cgroup is not None
        cpu_dir, memory_dir, v2 = watched.cgroup
        try:
            now = time.monotonic_ns()
            if v2:
                stat = _keyed(cpu_dir / "cpu.stat")
                cpu_ns = stat["usage_usec"] * 1000
                memory = int((memory_dir / "memory.current").read_text())
                memory -= _keyed(memory_dir / "memory.stat").get("inactive_file", 0)
                raw = (memory_dir / "memory.max").read_text().strip()
                limit = UNLIMITED if raw == "max" else int(raw)
            else:
                cpu_ns = int((cpu_dir / "cpuacct.usage").read_text())
                memory = int((memory_dir / "memory.usage_in_bytes").read_text())
                memory -= _keyed(memory_dir / "memory.stat").get("total_inactive_file", 0)
                limit = int((memory_dir / "memory.limit_in_bytes").read_text())
        except (OSError, ValueError, KeyError):
            return None  # gone (the container ended) or unreadable: the stats API decides
        return Sample(cpu_ns, now * self._cpus, max(0, memory), limit, "cgroup")

    async def _read_stats(self, watched: Watched) -> Sample | None:
        stats = await self.docker.stats(watched.container_id)
        if stats is None:
            return None
        try:
            cpu = stats["cpu_stats"]
            memory = stats["memory_stats"]
            used = int(memory["usage"])
            details = memory.get("stats") or {}
            used -= int(details.get("total_inactive_file", details.get("inactive_file", 0)))
            return Sample(
                int(cpu["cpu_usage"]["total_usage"]),
                int(cpu["system_cpu_usage"]),
                max(0, used),
                int(memory.get("limit") or UNLIMITED),
                "stats",
            )
        except (KeyError, TypeError, ValueError):
            return None  # a stopped container has empty stats

    async def sample(self, watched: Watched) -> dict[str, float] | None:
        """This container's shares now ({"cpu_percent", "memory_percent"}).

        None when no source could be read (gone, or the monitor cannot see
        it: `watched.failure` says why; tick() tells the two apart).
        """
        if watched.cgroup is None and self.source != "stats":
            watched.cgroup = self._find_cgroup(watched.pid)  # the files may be back
        current = self._read_cgroup(watched) if watched.cgroup else None
        if current is None:
            if watched.cgroup is not None:
                watched.cgroup = None
                watched.previous = None
            if self.source == "cgroup":
                watched.failure = f"no readable cgroup files under {self.cgroup_root}"
                return None
            try:
                current = await self._read_stats(watched)
            except TrustplaneError as exc:
                watched.failure = f"no cgroup files, and the Engine stats API: {exc}"
                return None
        if current is None:
            watched.failure = "no cgroup files, and no stats from the Engine API"
            return None
        previous, watched.previous = watched.previous, current
        limit = min(current.limit, self._host_memory) if self._host_memory else current.limit
        shares = {"memory_percent": 100.0 * current.memory / max(1, limit)}
        if previous is not None and previous.source == current.source:
            elapsed = current.system_ns - previous.system_ns
            if elapsed > 0:
                used = max(0, current.cpu_ns - previous.cpu_ns)
                shares["cpu_percent"] = min(100.0, 100.0 * used / elapsed)
        shares["memory_bytes"] = float(current.memory)
        shares["memory_limit"] = float(limit)
        watched.last = shares
        return shares

    async def usage(self, container_id: str, pid: int) -> dict[str, float]:
        """A container's current resource use, for the metadata of a decision about it.

        A watched container has its last shares (CPU share included); any
        other running one is read once: memory, and CPU time so far (a share
        needs two samples). Empty when it is not running or cannot be read.
        """
        watched = self.watched.get(container_id)
        if watched is not None and watched.last:
            shares = dict(watched.last)
        elif pid > 0:
            cgroup = self._find_cgroup(pid) if self.source != "stats" else None
            probe = Watched(container_id, "", "", 0.0, pid=pid, cgroup=cgroup)
            try:
                read = await self.sample(probe)
            except TrustplaneError as exc:
                log.warning("monitor: cannot read %s: %s", container_id[:12], exc)
                return {}
            if read is None or probe.previous is None:
                return {}
            shares = {**read, "cpu_seconds": probe.previous.cpu_ns / 1e9}
        else:
            return {}
        return {key: round(value, 3) for key, value in shares.items()}

    # -- deciding --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the monitor must outlive one bad sample
                log.exception("monitor: sample failed")
                self._account(f"sampling failed ({type(exc).__name__})")
            await asyncio.sleep(self.thresholds.interval)

    async def tick(self) -> None:
        """Sample every watched container; stop the newest one over threshold long enough.

        A container that cannot be sampled stays watched while it runs; the
        round counts toward blindness (see the module's docstring).
        """
        now = time.monotonic()
        offenders: list[tuple[Watched, str, float, float]] = []
        unsampled: list[Watched] = []
        limits = {
            "cpu_percent": self.thresholds.cpu_percent,
            "memory_percent": self.thresholds.memory_percent,
        }
        for watched in list(self.watched.values()):
            shares = await self.sample(watched)
            if shares is None:
                if await self._running(watched):
                    unsampled.append(watched)
                else:
                    self.watched.pop(watched.container_id, None)
                continue
            for metric, limit in limits.items():
                value = shares.get(metric)
                if value is None or value <= limit:
                    watched.over_since.pop(metric, None)
                    continue
                since = watched.over_since.setdefault(metric, now)
                if now - since >= self.thresholds.sustain:
                    offenders.append((watched, metric, value, now - since))
        if unsampled:
            self._account(
                f"{len(unsampled)} of {len(self.watched)} watched containers cannot be "
                f"sampled: {unsampled[0].failure}"
            )
        elif not self.watched:
            self._account(await self._probe())
        else:
            self._account(None)
        if offenders:
            watched, metric, value, sustained = max(offenders, key=lambda o: o[0].started)
            await self._stop(watched, metric, value, sustained)

    async def _running(self, watched: Watched) -> bool:
        """Is the container still running? (True when dockerd cannot say: keep it.)"""
        try:
            container = await self.docker.inspect("containers", watched.container_id)
        except TrustplaneError:
            return True
        state = container.get("State") if container is not None else None
        return isinstance(state, dict) and bool(state.get("Running"))

    async def _probe(self) -> str | None:
        """With nothing watched: why a container started now could not be sampled, or None."""
        reasons: list[str] = []
        if self.source != "stats":
            if self._cgroup_readable():
                return None
            reasons.append(f"no readable cgroup files under {self.cgroup_root}")
        if self.source != "cgroup":
            try:
                await self.docker.ping()
            except TrustplaneError as exc:
                reasons.append(f"the Engine stats API: {exc}")
            else:
                return None
        return "; ".join(reasons)

    def _cgroup_readable(self) -> bool:
        """The cgroup root answers: v2's controller list, or v1's memory and cpuacct."""
        root = self.cgroup_root
        try:
            if (root / "cgroup.controllers").exists():
                (root / "cgroup.controllers").read_bytes()
                return True
            int((root / "memory" / "memory.usage_in_bytes").read_text())
            for mount in ("cpuacct", "cpu,cpuacct"):
                usage = root / mount / "cpuacct.usage"
                if usage.exists():
                    int(usage.read_text())
                    return True
        except (OSError, ValueError):
            pass
        return False

    def _account(self, problem: str | None) -> None:
        """One round's outcome: blind after BLIND_AFTER failures in a row, seeing after one."""
        if problem is None:
            self._failed_rounds = 0
            if self.blind is not None:
                blind_for = time.time() - (self.blind_since or time.time())
                log.warning("monitor: sampling again after %.1f s blind", blind_for)
                self._report_status(
                    "monitor recovered", reason=self.blind, blind_seconds=round(blind_for, 1)
                )
                self.blind, self.blind_since = None, None
            return
        self._failed_rounds += 1
        if self.blind is not None:
            self.blind = problem  # the latest reason
            return
        if self._failed_rounds >= BLIND_AFTER:
            self.blind, self.blind_since = problem, time.time()
            log.error("monitor: blind: %s; container starts are %s", problem, self._starts())
            self._report_status("monitor blind", reason=problem, failed_rounds=self._failed_rounds)

    def _starts(self) -> str:
        return "allowed" if self.blind is None or self.allow_blind else "refused"

    def _report_status(self, event: str, **details: str | int | float) -> None:
        if self.reporter is not None:
            self.reporter.report(
                "gateway.status",
                {
                    "event": event,
                    "watched": len(self.watched),
                    "source": self.source,
                    "starts": self._starts(),
                    **details,
                },
            )

    def refuse_start_if_blind(self) -> None:
        """UnavailableError while the monitor that must watch a new container cannot see."""
        if self.blind is not None and not self.allow_blind:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.blind_since or 0))
            raise UnavailableError(
                f"trustplane gateway: the resource monitor cannot sample ({self.blind}) since "
                f"{since}; container starts are refused until it can (--allow-blind-monitor "
                "starts them unwatched)"
            )

    async def _stop(self, watched: Watched, metric: str, value: float, sustained: float) -> None:
        threshold = getattr(self.thresholds, metric)
        try:
            status = await self.docker.stop_container(watched.container_id)
            result = "stopped" if status in (204, 304) else f"dockerd answered {status}"
        except TrustplaneError as exc:
            result = f"not stopped: {exc}"
        if result == "stopped":
            self.watched.pop(watched.container_id, None)
        record: dict[str, Any] = {
            "action": "container.stop",
            "result": result,
            "container": watched.name,
            "container_id": watched.container_id[:12],
            "image": watched.image,
            "metric": metric,
            "value": round(value, 2),
            "threshold": threshold,
            "sustained_s": round(sustained, 2),
            "memory_bytes": int(watched.last.get("memory_bytes", 0)),
            "memory_limit": int(watched.last.get("memory_limit", 0)),
            "cpu_percent": round(watched.last.get("cpu_percent", 0.0), 2),
            "memory_percent": round(watched.last.get("memory_percent", 0.0), 2),
            "source": "cgroup" if watched.cgroup else "stats",
        }
        self.stopped.append(record)
        log.warning(
            "monitor: %s %s: %s %.1f%% over %.1f%% for %.1fs",
            result,
            watched.name,
            metric,
            value,
            threshold,
            sustained,
        )
        if self.reporter is not None:
            self.reporter.report("gateway.monitor", record)

    def health(self) -> dict[str, Any]:
        """Whether the monitor can see (the gateway's health; no container names)."""
        return {
            "blind": self.blind is not None,
            "reason": self.blind,
            "since": self.blind_since,
            "source": self.source,
            "starts": self._starts(),
            "watched": len(self.watched),
        }

    def status(self) -> dict[str, Any]:
        """What is watched and its last shares (for status reports)."""
        return {
            "watched": len(self.watched),
            "stopped": len(self.stopped),
            "blind": self.blind,
            "containers": {
                w.name: {k: round(v, 2) for k, v in w.last.items()} for w in self.watched.values()
            },
        }


def _keyed(path: Path) -> dict[str, int]:
    """A cgroup `key value` file as a dict."""
    result: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            result[key] = int(value)
    return result


def _host_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
