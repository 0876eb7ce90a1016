"""What the guest runner sends: a script without secrets, secrets only as 0600 files.

Whoever reads the request (the script the guest's shell runs, and so the
argv and environment of every process in the guest) must find paths, not
key material.
"""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from trustplane.embedded.guest_runner import build_request
from trustplane.tools import Command, SecretFd, SecretFile

DIRECTORY = "/run/tp/abc1"


def _members(payload: bytes) -> dict[str, tuple[int, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        out = {}
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            out[member.name] = (member.mode, data)
        return out


def test_secrets_are_files_and_the_script_names_only_paths() -> None:
    file_secret, fd_secret, stdin_secret = (os.urandom(16) for _ in range(3))
    command = Command.of(
        [
            *("cryptsetup", "open", "--key-file", SecretFd(fd_secret), "/dev/vda", "x"),
            *("--header-backup-file", SecretFile(file_secret, "name={}")),
        ],
        stdin=stdin_secret,
        env={"DM_DISABLE_UDEV": "1"},
    )
    members = _members(build_request(command, DIRECTORY))
    mode, script = members["cmd"]
    assert mode == 0o600
    for secret in (file_secret, fd_secret, stdin_secret):
        assert secret not in script
        assert secret.hex().encode() not in script
    assert members["s"][0] == 0o700
    assert members["s/0"] == (0o600, fd_secret)
    assert members["s/1"] == (0o600, file_secret)
    assert members["s/stdin"] == (0o600, stdin_secret)
    text = script.decode()
    assert f"exec 4<{DIRECTORY}/s/0" in text
    assert f"exec 0<{DIRECTORY}/s/stdin" in text
    # Descriptor-borne secrets are unlinked before the tool starts.
    assert f"rm -f {DIRECTORY}/s/0 {DIRECTORY}/s/stdin" in text
    assert f"name={DIRECTORY}/s/1" in text
    assert "/dev/fd/4" in text
    assert "export DM_DISABLE_UDEV=1" in text
    assert text.rstrip().splitlines()[-1].startswith('exec "$program" open --key-file /dev/fd/4')


def test_argv_words_are_quoted_for_the_guest_shell() -> None:
    script = _members(build_request(Command.of(["/bin/echo", "a b", "$(reboot)", "it's"]), "/x"))
    text = script["cmd"][1].decode()
    assert text.rstrip().splitlines()[-1] == "exec /bin/echo 'a b' '$(reboot)' 'it'\"'\"'s'"


def test_limits_are_enforced() -> None:
    too_many = Command.of(["cat", *(SecretFd(b"k") for _ in range(7))])
    with pytest.raises(ValueError, match="at most 6 SecretFd"):
        build_request(too_many, DIRECTORY)
    with pytest.raises(ValueError, match="bad environment variable name"):
        build_request(Command.of(["true"], env={"A=B; reboot": "x"}), DIRECTORY)
