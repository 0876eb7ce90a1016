"""The executor's runner into a test guest: same commands, a kernel with device-mapper.

A driver takes an `Executor`; in production it runs on the host
(`LocalRunner`), in the tests on `GuestRunner`, and its code is the same.
Each call becomes one request on the guest's command channel: a shell
script that execs the tool, and the secrets as 0600 files in the
request's private 0700 directory on the guest's tmpfs:

- `SecretFile` stays a file there until the tool exits, then goes;
- `SecretFd` is opened as descriptor 4..9 and unlinked before the tool
  starts, which reads it as `/dev/fd/N`;
- stdin is opened and unlinked the same way.

Nothing secret is in the script (so in no argv or environment in the guest)
or in the host's argv. A bare program name is looked up on PATH, so the
real `mke2fs` or `losetup` wins over busybox's applet of the same name.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import shlex
import tarfile

from trustplane.embedded.guest_channel import RUN_DIR, GuestChannel
from trustplane.errors import UnsupportedError
from trustplane.tools import Command, Completed, Runner, SecretArg, SecretFile, Started

_FIRST_FD = 4
_LAST_FD = 9  # the shell redirects single-digit descriptors only
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class GuestRunner(Runner):
    """Runs one-shot tools inside the guest on the other end of `channel`."""

    name = "guest"

    def __init__(self, channel: GuestChannel, *, margin: float = 30.0) -> None:
        self.channel = channel
        self.margin = margin
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    def run(self, command: Command, timeout: float) -> Completed:
        request_id = f"{self._prefix}{next(self._ids)}"
        payload = build_request(command, f"{RUN_DIR}/{request_id}")
        reply = self.channel.request(request_id, payload, timeout, self.margin)
        if reply.timed_out:
            return Completed(None, reply.stdout, reply.stderr, timed_out=True)
        return Completed(reply.status, reply.stdout, reply.stderr)

    def start(self, command: Command) -> Started:
        raise UnsupportedError(
            f"{command.tool}: the test guest runs one-shot tools; long-running ones run on the host"
        )


def build_request(command: Command, directory: str) -> bytes:
    """The tar the agent unpacks into `directory`: `cmd` and the secret files under `s/`."""
    secrets: dict[str, bytes] = {}
    redirects: list[str] = []
    unlink: list[str] = []
    fds = iter(range(_FIRST_FD, _LAST_FD + 1))

    def place(index: int, arg: SecretArg) -> str:
        path = f"{directory}/s/{index}"
        secrets[f"s/{index}"] = arg.value
        if isinstance(arg, SecretFile):
            return path
        fd = next(fds, None)
        if fd is None:
            raise ValueError(f"at most {_LAST_FD - _FIRST_FD + 1} SecretFd per call in the guest")
        redirects.append(f"exec {fd}<{shlex.quote(path)}")
        unlink.append(path)
        return f"/dev/fd/{fd}"

    argv = command.render(place)
    lines = ["set -e"]
    if command.stdin is not None:
        secrets["s/stdin"] = command.stdin
        redirects.append(f"exec 0<{shlex.quote(directory + '/s/stdin')}")
        unlink.append(f"{directory}/s/stdin")
    lines += redirects
    if unlink:
        lines.append("rm -f " + " ".join(shlex.quote(p) for p in unlink))
    for variable, setting in command.env.items():
        if not _ENV_NAME.fullmatch(variable):
            raise ValueError(f"bad environment variable name {variable!r}")
        lines.append(f"export {variable}={shlex.quote(setting)}")
    if command.cwd is not None:
        lines.append(f"cd {shlex.quote(command.cwd)}")
    program = argv[0]
    if "/" not in program:
        # Busybox's shell runs its own applet before looking at PATH, and its
        # mke2fs and losetup lack what drivers use: resolve the name on PATH.
        lines.append(f"program=$(which {shlex.quote(program)}) || program={shlex.quote(program)}")
        program_word = '"$program"'
    else:
        program_word = shlex.quote(program)
    lines.append(" ".join(["exec", program_word, *(shlex.quote(word) for word in argv[1:])]))
    script = ("\n".join(lines) + "\n").encode()

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "cmd", script, 0o600)
        if secrets:
            directory_entry = tarfile.TarInfo("s")
            directory_entry.type = tarfile.DIRTYPE
            directory_entry.mode = 0o700
            tar.addfile(directory_entry)
        for member, value in secrets.items():
            _add(tar, member, value, 0o600)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))
