"""A command channel into a test guest over virtio-serial, both ends.

The guest side is `AGENT_SCRIPT`, a busybox shell loop (the guest has no
Python). The host side is `GuestChannel`. The port is a character device,
not a tty, so bytes pass unchanged. One request at a time:

    host  -> guest   RUN <id> <timeout-seconds> <length>\\n  <tar of length bytes>
    guest -> host    DONE <status> <timed-out 0|1> <stdout length> <stderr length>\\n
                     <stdout bytes><stderr bytes>
    host  -> guest   EXIT <code>\\n      (the guest leaves QEMU through isa-debug-exit)

The tar holds `cmd` (a shell script the host wrote: it sets up inherited
descriptors and execs the tool) and `s/` (secret files and stdin, 0600).
The agent unpacks it into a fresh 0700 directory on tmpfs, runs `cmd` in a
new session with the timeout enforced by a watchdog that kills the whole
session, removes `s/` as soon as the command is over, then answers.
The shell's `read` takes one byte at a time and `head -c` stops at the
payload's length, and the host sends nothing more until it has the answer,
so no read ever swallows the next message.

The guest has one channel, held by the process that booted it. Other
processes on this host (a test's child that is killed mid-import) reach it
through `ChannelRelay`: a unix socket in the guest's private 0700 directory
that speaks the agent's RUN/DONE protocol and forwards each request over the
one channel, one at a time; `GuestChannel.connect` is its client.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trustplane.errors import UnavailableError

PORT_NAME = "trustplane.0"
READY_LINE = b"TPREADY"
RUN_DIR = "/run/tp"
"""tmpfs directory where each request gets its private 0700 directory `<RUN_DIR>/<id>`."""
_REQUEST_ID = re.compile(r"[a-z0-9]{1,32}")

AGENT_SCRIPT = f"""#!/bin/sh
# trustplane command agent: see trustplane/embedded/guest_channel.py
umask 077
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = {PORT_NAME} ] && port=/dev/${{p##*/}}
done
[ -n "$port" ] || {{ echo "agent: no virtio port {PORT_NAME}" >&2; /sbin/qemu-exit 90; }}
exec 3<>"$port"
mkdir -p {RUN_DIR}
chmod 700 {RUN_DIR}
echo {READY_LINE.decode()} >&3
while :; do
    if ! read -r verb id limit length <&3; then
        sleep 0.1
        continue
    fi
    case "$verb" in
    RUN)
        case "$id" in *[!a-z0-9]*|"") echo "agent: bad id" >&2; continue ;; esac
        d={RUN_DIR}/$id
        mkdir -m 700 "$d"
        head -c "$length" <&3 > "$d/req.tar"
        tar -x -f "$d/req.tar" -C "$d"
        rm -f "$d/req.tar"
        setsid sh "$d/cmd" < /dev/null > "$d/out" 2> "$d/err" 3>&- &
        pid=$!
        setsid sh -c "sleep $limit; touch '$d/timedout'; kill -KILL -$pid $pid" \\
            < /dev/null > /dev/null 2>&1 3>&- &
        watchdog=$!
        wait "$pid"
        status=$?
        # The group (once the watchdog is in its own session) and the process
        # itself (before it got there), or `wait` would sit out its sleep.
        kill -KILL -"$watchdog" "$watchdog" 2>/dev/null
        wait "$watchdog" 2>/dev/null
        kill -KILL -"$pid" 2>/dev/null
        rm -rf "$d/s"
        timedout=0
        [ -e "$d/timedout" ] && timedout=1
        echo "DONE $status $timedout $(wc -c < "$d/out") $(wc -c < "$d/err")" >&3
        cat "$d/out" "$d/err" >&3
        rm -rf "$d"
        ;;
    EXIT)
        sync
        /sbin/qemu-exit "$id"
        ;;
    esac
done
"""


@dataclass(frozen=True)
class Reply:
    status: int
    timed_out: bool
    stdout: bytes
    stderr: bytes


class GuestChannel:
    """The host end: a connected unix socket that QEMU's virtio-serial chardev dialled."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._lock = threading.Lock()
        self._broken = False

    @classmethod
    def accept(
        cls, listener: socket.socket, deadline: float, alive: Callable[[], bool]
    ) -> GuestChannel:
        """Wait for QEMU to dial `listener`, then for the agent's ready line."""
        while True:
            if not alive():
                raise UnavailableError("QEMU exited before its command channel connected")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnavailableError("QEMU did not connect its command channel in time")
            listener.settimeout(min(remaining, 0.2))
            try:
                sock, _ = listener.accept()
                break
            except TimeoutError:
                continue
        channel = cls(sock)
        try:
            while channel._read_line(deadline).strip() != READY_LINE:
                pass
        except TimeoutError as exc:
            channel.close()
            raise UnavailableError("the guest agent did not start in time") from exc
        except BaseException:
            channel.close()
            raise
        return channel

    @classmethod
    def connect(cls, path: Path) -> GuestChannel:
        """A channel through the `ChannelRelay` listening at `path` (another process's guest)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            raise UnavailableError(
                f"the test guest's relay {path} does not answer: {exc}"
            ) from None
        return cls(sock)

    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self._buffer:
            self._fill(deadline)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _read_exact(self, size: int, deadline: float) -> bytes:
        while len(self._buffer) < size:
            self._fill(deadline)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the guest did not answer in time")
        self._sock.settimeout(remaining)
        chunk = self._sock.recv(1 << 16)
        if not chunk:
            raise UnavailableError("the guest closed its command channel")
        self._buffer += chunk

    def request(self, request_id: str, payload: bytes, timeout: float, margin: float) -> Reply:
        """Send one RUN request and wait for its reply; the guest enforces `timeout`.

        `margin` is how much longer the host waits before it declares the
        guest itself unresponsive.
        """
        if not _REQUEST_ID.fullmatch(request_id):
            raise ValueError(f"bad request id {request_id!r}")
        with self._lock:
            if self._broken:
                raise UnavailableError("the guest's command channel is broken (an earlier timeout)")
            self._sock.settimeout(None)
            self._sock.sendall(b"RUN %s %.3f %d\n" % (request_id.encode(), timeout, len(payload)))
            self._sock.sendall(payload)
            deadline = time.monotonic() + timeout + margin
            try:
                header = self._read_line(deadline).split()
                if len(header) != 5 or header[0] != b"DONE":
                    raise UnavailableError(f"unexpected reply from the guest agent: {header[:1]!r}")
                status, timed_out, out_len, err_len = (int(x) for x in header[1:])
                stdout = self._read_exact(out_len, deadline)
                stderr = self._read_exact(err_len, deadline)
            except (TimeoutError, UnavailableError, ValueError) as exc:
                self._broken = True
                raise UnavailableError(f"the guest did not answer: {exc}") from exc
            return Reply(status, timed_out == 1, stdout, stderr)

    def exit(self, code: int) -> None:
        """Ask the guest to leave QEMU with `code` (QEMU exits with code*2+1)."""
        with self._lock:
            self._sock.sendall(b"EXIT %d\n" % code)

    def close(self) -> None:
        self._sock.close()


class ChannelRelay:
    """Serves the agent's protocol on a unix socket and forwards over `channel`.

    One thread per connected process; requests from all of them (and from
    the channel's own process) reach the guest one at a time. EXIT is the
    channel owner's alone and is not relayed.
    """

    def __init__(self, channel: GuestChannel, path: Path, *, margin: float = 30.0) -> None:
        self.channel = channel
        self.path = path
        self.margin = margin
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(os.fspath(path))
        path.chmod(0o600)
        self._listener.listen(16)
        self._connections: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="guest-relay", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="guest-relay-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError, UnavailableError), conn:
            stream = conn.makefile("rb")
            while True:
                words = stream.readline().split()
                if len(words) != 4 or words[0] != b"RUN":
                    return
                request_id, limit, length = words[1].decode(), float(words[2]), int(words[3])
                payload = stream.read(length)
                if len(payload) != length:
                    return
                reply = self.channel.request(request_id, payload, limit, self.margin)
                header = b"DONE %d %d %d %d\n" % (
                    reply.status,
                    int(reply.timed_out),
                    len(reply.stdout),
                    len(reply.stderr),
                )
                conn.sendall(header + reply.stdout + reply.stderr)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.path.unlink(missing_ok=True)
