"""Control-plane throughput: KMS payload fetch, unwrap, authorize, log append.

The script starts everything itself on 127.0.0.1: a `trustplane server`
(SQLite in its data directory, or a private PostgreSQL it also starts),
then prepares what the requests need through the API: a user with the
`operator` role and its token, a secret it created (so the ACL and the
policy both let it read the payload), a KMS-held recipient, a real
ocicrypt layer-key JWE to that recipient for a layer digest registered
with `POST /v1/images`, and a transport key pair. Each answer is checked
once (the payload matches, the unwrapped JWE opens with the transport key
to the very private options, the decision is `allow`) before the load.

The load comes from `wrk` (Debian package `wrk`): HTTPS with keep-alive,
32 connections by default (32 concurrent clients), the body and headers
from a small Lua script, the latency percentiles from wrk's own histogram.
wrk is C and takes little of the machine's CPU from the server; a Python
load generator would not. Each operation is measured twice:

- saturated: every client sends its next request as soon as it has the
  answer to the last one (a closed loop). This gives the most requests per
  second the server does; its latency is mostly the clients' own queue,
  since with N clients and X requests/s the mean latency is N/X (32 clients
  at 1000/s wait 32 ms on average, whatever the server does).
- paced (`--rate`, 1000/s by default): the same 32 clients, each pausing
  for a random, exponentially distributed time between an answer and its
  next request, the mean pause chosen so that together they send about
  `--rate` requests per second. Its p50/p99 are the latency a client sees
  at that load. (wrk has no fixed-rate mode; wrk2, which has, is not in
  Debian.)

Operations (each one appends one entry to the transparency log and waits
until it is committed, before the answer):

- payload    GET  /v1/secrets/<id>/payload   ACL + policy, logged release
- unwrap     POST /v1/unwrap                 JWE open, policy with tier, logged,
                                             re-wrapped to the transport key
- authorize  POST /v1/authorize              policy decision, logged

"log append" is the number of log entries committed per second during the
authorize run, read from the log size before and after it (`/healthz`):
the authorize endpoint does nothing but a policy check and a durable append,
so it is the append path as clients see it. The `log/s` column shows the
same count for every operation, proving each answered request was logged.

    python benchmarks/control_plane.py [--backends sqlite,postgres] [--seconds 10]
        [--connections 32] [--set workers=2 --set log_batch_wait_ms=1]

`--set KEY=VALUE` goes into DATA_DIR/server.yaml (values parsed as YAML).
Prints one row per operation and backend: saturated req/s, p50 and p99;
paced req/s, p50 and p99; errors (both runs); log entries committed per
second while saturated; CPU used by the server (and PostgreSQL) and by wrk
while saturated, in % of one core. Then whether the goals are met: unwrap
>= 1000/s, with p99 <= 20 ms at 1000/s; log appends >= 1000/s.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.api.images import LayerRecord
from trustplane.crypto import keywrap
from trustplane.crypto.keys import load_recipient_key, load_unwrap_key
from trustplane.crypto.layer_cipher import PrivateOptions
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.postgres import start_postgres

OPERATIONS = ("payload", "unwrap", "authorize")
UNWRAP_GOAL = 1000.0
UNWRAP_P99_MS = 20.0
APPEND_GOAL = 1000.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPOSITORY = "registry.example/bench/app"

LUA = """
wrk.method = {method}
wrk.path = {path}
wrk.body = {body}
wrk.headers["Authorization"] = {auth}
wrk.headers["Content-Type"] = "application/json"

local think = {think_ms}
if think > 0 then
  -- exponential pauses (wrk counts them in whole milliseconds)
  delay = function() return math.floor(-think * math.log(1 - math.random()) + 0.5) end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK-JSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d," ..
    "\\"mean_us\\":%f,\\"max_us\\":%d,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d," ..
    "\\"status\\":%d,\\"timeout\\":%d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: str


@dataclass(frozen=True)
class Run:
    """One wrk run: answered requests per second and latency percentiles."""

    rate: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int


@dataclass(frozen=True)
class Result:
    operation: str
    backend: str
    saturated: Run
    paced: Run | None
    log_rate: float
    """Log entries committed per second during the saturated run."""
    server_cpu: float
    db_cpu: float | None
    wrk_cpu: float
    steal: float
    """Share of the machine's CPU time its host took (VM steal), in %."""

    @property
    def errors(self) -> int:
        return self.saturated.errors + (self.paced.errors if self.paced else 0)


@dataclass(frozen=True)
class Fixture:
    plane: RunningControlPlane
    token: str
    requests: dict[str, Request]


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"control_plane benchmark: {message}")


def lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal here


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) of process `root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks of the machine so far: a VM's host may take
    cycles from it, which shows up as 'steal' and makes every figure lower."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(fields[:8]), fields[7]


def log_size(plane: RunningControlPlane) -> int:
    answer = httpx.get(f"{plane.url}/healthz", verify=plane.ssl_context(), timeout=30)
    answer.raise_for_status()
    return int(answer.json()["log_size"])


def prepare(plane: RunningControlPlane) -> Fixture:
    """A user, its secret, a recipient, a registered layer and its annotation."""
    password = "bench-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
    with plane.admin() as admin:
        admin.create_user("bench", "operator", password)
        recipient = admin.create_recipient("bench-recipient")
    client = plane.client()
    client.login("bench", password)
    assert client.token is not None

    payload = os.urandom(32)
    secret = client.create_secret(payload, name="bench-secret")

    digest = "sha256:" + hashlib.sha256(os.urandom(32)).hexdigest()
    options = PrivateOptions(symkey=os.urandom(32), nonce=os.urandom(16), digest=digest)
    to_kms = load_recipient_key(recipient.public_key.encode(), "kms:bench-recipient")
    jwe = keywrap.wrap(options.to_json(), [to_kms])
    annotation = base64.b64encode(jwe.encode()).decode()
    client.register_image(
        REPOSITORY,
        "sha256:" + hashlib.sha256(b"manifest").hexdigest(),
        [LayerRecord(index=0, digest=digest, encrypted=True)],
    )
    transport = ec.generate_private_key(ec.SECP256R1())
    transport_pem = (
        transport.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )

    # Each operation answers correctly once before it is measured.
    check(client.secret_payload(secret.id) == payload, "the payload differs")
    answer = client.unwrap(annotation, transport_pem)
    transport_private = load_unwrap_key(
        transport.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "transport key",
    )
    opened = keywrap.unwrap(answer.jwe, [transport_private], "unwrap answer")
    check(opened is not None, "the unwrap answer does not open with the transport key")
    assert opened is not None
    check(PrivateOptions.from_json(opened) == options, "the unwrap answer differs")
    decision = client.authorize("image.pull", f"image:{REPOSITORY}")
    check(decision.decision == "allow", f"authorize answers {decision}")
    client.close()

    return Fixture(
        plane,
        client.token,
        {
            "payload": Request("GET", f"/v1/secrets/{secret.id}/payload", ""),
            "unwrap": Request(
                "POST",
                "/v1/unwrap",
                json.dumps({"annotation": annotation, "transport_key": transport_pem}),
            ),
            "authorize": Request(
                "POST",
                "/v1/authorize",
                json.dumps({"action": "image.pull", "resource": f"image:{REPOSITORY}"}),
            ),
        },
    )


def run_wrk(
    fixture: Fixture,
    request: Request,
    work: Path,
    seconds: float,
    args: argparse.Namespace,
    think_ms: float = 0.0,
) -> tuple[Run, float]:
    """Run wrk; returns its summary and the CPU seconds wrk used."""
    script = work / "request.lua"
    script.write_text(
        LUA.format(
            method=lua_string(request.method),
            path=lua_string(request.path),
            body=lua_string(request.body) if request.body else "nil",
            auth=lua_string(f"Bearer {fixture.token}"),
            think_ms=f"{think_ms:.3f}",
        )
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run(
        [
            "wrk",
            f"-t{args.wrk_threads}",
            f"-c{args.connections}",
            f"-d{seconds:g}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            fixture.plane.url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise SystemExit(f"wrk failed ({completed.returncode}): {completed.stderr.strip()}")
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("WRK-JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary:\n{completed.stdout}\n{completed.stderr}")
    summary = json.loads(line.removeprefix("WRK-JSON "))
    duration = summary["duration_us"] / 1e6
    run = Run(
        rate=(summary["requests"] - summary["status"]) / duration,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        mean_ms=summary["mean_us"] / 1000,
        errors=sum(summary[k] for k in ("connect", "read", "write", "status", "timeout")),
    )
    wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return run, wrk_cpu


def paced(
    fixture: Fixture, request: Request, work: Path, args: argparse.Namespace, saturated: Run
) -> Run | None:
    """A run at about `args.rate` requests/s, or None when the server cannot do that many.

    Each client's cycle is its pause plus the latency: N clients at rate R
    need cycles of N/R seconds. A short pilot run measures the latency and
    the pause wrk really makes (its timers add a little), and the pause of
    the measured run is set from them.
    """
    if args.rate <= 0 or saturated.rate < args.rate:
        return None
    cycle_ms = 1000 * args.connections / args.rate
    think = max(cycle_ms - saturated.mean_ms / 4, 1.0)
    pilot, _ = run_wrk(fixture, request, work, 3, args, think)
    made = 1000 * args.connections / pilot.rate - pilot.mean_ms  # the pause wrk made
    think = max(think * (cycle_ms - pilot.mean_ms) / max(made, 1.0), 0.0)
    run, _ = run_wrk(fixture, request, work, args.seconds, args, think)
    return run


def measure(
    fixture: Fixture,
    operation: str,
    backend: str,
    work: Path,
    args: argparse.Namespace,
    db_pid: int | None,
) -> Result:
    request = fixture.requests[operation]
    server_pid = fixture.plane.process.pid
    assert server_pid is not None
    if args.warmup > 0:
        run_wrk(fixture, request, work, args.warmup, args)
    size_before = log_size(fixture.plane)
    cpu_before = tree_cpu_seconds(server_pid)
    db_before = tree_cpu_seconds(db_pid) if db_pid else 0.0
    started, ticks = time.monotonic(), cpu_ticks()
    saturated, wrk_cpu = run_wrk(fixture, request, work, args.seconds, args)
    elapsed, ticks_after = time.monotonic() - started, cpu_ticks()
    cpu = tree_cpu_seconds(server_pid) - cpu_before
    db_cpu = tree_cpu_seconds(db_pid) - db_before if db_pid else None
    size_after = log_size(fixture.plane)
    return Result(
        operation=operation,
        backend=backend,
        saturated=saturated,
        paced=paced(fixture, request, work, args, saturated),
        log_rate=(size_after - size_before) / args.seconds,
        server_cpu=100 * cpu / elapsed,
        db_cpu=100 * db_cpu / elapsed if db_cpu is not None else None,
        wrk_cpu=100 * wrk_cpu / elapsed,
        steal=100 * (ticks_after[1] - ticks[1]) / max(ticks_after[0] - ticks[0], 1),
    )


@contextmanager
def backend_database(backend: str, work: Path) -> Iterator[tuple[str | None, int | None]]:
    """The database URL for the backend (None: the server's SQLite) and its server's pid."""
    if backend == "sqlite":
        yield None, None
        return
    with start_postgres() as postgres:
        yield postgres.url, postgres.process.pid


def run_backend(backend: str, args: argparse.Namespace, settings: dict[str, Any]) -> list[Result]:
    work = Path(tempfile.mkdtemp(prefix=f"trustplane-bench-{backend}-"))
    try:
        with backend_database(backend, work) as (url, db_pid):
            data = work / "data"
            data.mkdir(mode=0o700)
            values = dict(settings)
            if url is not None:
                values["database_url"] = url
            config = data / "server.yaml"
            config.write_text(yaml.safe_dump(values))
            config.chmod(0o600)
            plane = start_control_plane(work, data_dir=data, timeout=120)
            try:
                fixture = prepare(plane)
                results = []
                for operation in args.operations:
                    result = measure(fixture, operation, backend, work, args, db_pid)
                    print_row(result, file=sys.stderr)
                    results.append(result)
                return results
            finally:
                plane.stop()
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


HEADER = (
    f"{'':<20} {'-- saturated --':^23} {'---- paced ----':^23}\n"
    f"{'operation':<10} {'backend':<9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'log/s':>6} "
    f"{'server%':>7} {'db%':>4} {'wrk%':>4} {'steal%':>6}"
)


def print_row(result: Result, file: Any = None) -> None:
    sat, pace = result.saturated, result.paced
    db = f"{result.db_cpu:4.0f}" if result.db_cpu is not None else f"{'-':>4}"
    paced_cells = (
        f"{pace.rate:7.0f} {pace.p50_ms:7.2f} {pace.p99_ms:7.2f}"
        if pace is not None
        else f"{'-':>7} {'-':>7} {'-':>7}"
    )
    print(
        f"{result.operation:<10} {result.backend:<9} {sat.rate:7.0f} {sat.p50_ms:7.2f} "
        f"{sat.p99_ms:7.2f} {paced_cells} {result.errors:6d} {result.log_rate:6.0f} "
        f"{result.server_cpu:7.0f} {db} {result.wrk_cpu:4.0f} {result.steal:6.1f}",
        file=file or sys.stdout,
        flush=True,
    )


def goals(results: list[Result], rate: float) -> list[str]:
    lines = []
    for backend in dict.fromkeys(r.backend for r in results):
        by_op = {r.operation: r for r in results if r.backend == backend}
        if (unwrap := by_op.get("unwrap")) is not None:
            pace = unwrap.paced
            met = (
                unwrap.saturated.rate >= UNWRAP_GOAL
                and pace is not None
                and rate >= UNWRAP_GOAL
                and pace.p99_ms <= UNWRAP_P99_MS
                and not unwrap.errors
            )
            at_rate = f"p99 {pace.p99_ms:.1f} ms at {pace.rate:.0f}/s" if pace else "no paced run"
            lines.append(
                f"{backend}: unwrap up to {unwrap.saturated.rate:.0f}/s, {at_rate} "
                f"(goal >= {UNWRAP_GOAL:.0f}/s with p99 <= {UNWRAP_P99_MS:.0f} ms): "
                + ("met" if met else "NOT met")
            )
            strict = (
                unwrap.saturated.rate >= UNWRAP_GOAL and unwrap.saturated.p99_ms <= UNWRAP_P99_MS
            )
            lines.append(
                f"{backend}:   stricter reading, p99 <= {UNWRAP_P99_MS:.0f} ms while saturated: "
                f"p99 {unwrap.saturated.p99_ms:.1f} ms: " + ("met" if strict else "not met")
            )
        if (append := by_op.get("authorize")) is not None:
            met = append.log_rate >= APPEND_GOAL and not append.errors
            lines.append(
                f"{backend}: log append {append.log_rate:.0f}/s "
                f"(goal >= {APPEND_GOAL:.0f}/s): " + ("met" if met else "NOT met")
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="paced run's requests/s (0: none)"
    )
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a server setting"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args()
    args.operations = [op for op in args.operations.split(",") if op]
    if unknown := set(args.operations) - set(OPERATIONS):
        parser.error(f"unknown operations {sorted(unknown)}")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found; install the Debian package wrk")
    settings: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        settings[key] = yaml.safe_load(value)

    print(
        f"{args.connections} connections, {args.seconds:g} s per operation, "
        f"{os.cpu_count()} CPUs, settings {settings or 'default'}",
        file=sys.stderr,
    )
    print(HEADER, file=sys.stderr)
    results: list[Result] = []
    for backend in args.backends.split(","):
        results += run_backend(backend, args, settings)
    print(HEADER)
    for result in results:
        print_row(result)
    for line in goals(results, args.rate):
        print(line)


if __name__ == "__main__":
    main()
