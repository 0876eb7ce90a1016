"""The error contract as a new user meets it, command group by command group.

README: every expected failure is one line on stderr, `trustplane: error: ...`,
and one code of its table; exit 1 means a bug. Each row below is a wrong file,
directory, option value, address or a full disk, run through the installed
entry point; the test checks the code, the single line, and that nothing was
left behind (no output file, no partial directory, no initialised data
directory). Rows that need a registry or a control plane are in
tests/integration/test_cli_error_contract.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_cli

from trustplane.embedded.process import free_port
from trustplane.errors import ExitCode

NOWHERE = "https://127.0.0.1:9"  # a control plane URL nothing answers on (never contacted)
UUID = "0b5e3c8e-2a7d-4c41-9d62-3f2a9a1d8c11"
NODE = ("--server", NOWHERE, "--node", "n1")


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    """The command line; `{name}` stands for a path or port of the test (see `values`)."""
    code: ExitCode
    text: str
    """Part of the one error line (also formatted)."""
    absent: tuple[str, ...] = ()
    """Paths that must not exist afterwards: nothing half made is left."""
    stdin: str | None = None


CASES: dict[str, Case] = {
    # -- the parser itself ---------------------------------------------------------------
    "unknown command": Case(("bogus",), ExitCode.USAGE, "No such command 'bogus'"),
    "unknown option": Case(
        ("image", "inspect", "oci:{tmp}/x", "--bogus"), ExitCode.USAGE, "No such option: --bogus"
    ),
    "missing argument": Case(("image", "encrypt"), ExitCode.USAGE, "Missing argument"),
    "option without its value": Case(
        ("image", "encrypt", "oci:a", "oci:b", "-r", "jwe:k", "--layers"),
        ExitCode.USAGE,
        "requires an argument",
    ),
    "not a number": Case(("log", "show", "abc"), ExitCode.USAGE, "valid integer"),
    "group without a command": Case(("secret",), ExitCode.USAGE, "secret: missing command"),
    # -- values the control plane would refuse: refused first, naming the option -----------
    "role": Case(
        ("user", "create", "bob", "--role", "superuser", "--server", NOWHERE),
        ExitCode.USAGE,
        "'--role': 'superuser' is not one of 'admin', 'operator', 'user'",
    ),
    "user name": Case(
        ("user", "create", "bad name!", "--server", NOWHERE), ExitCode.USAGE, "user name"
    ),
    "revoking a name no user can have": Case(
        ("user", "revoke", "bad name!", "--server", NOWHERE), ExitCode.USAGE, "user name"
    ),
    "node kind": Case(
        ("node", "register", "n1", "--kind", "toaster", "--public-key", "{alice_pub}"),
        ExitCode.USAGE,
        "'--kind': 'toaster' is not one of 'host', 'gateway'",
    ),
    "recipient key type": Case(
        ("recipient", "create", "r1", "--type", "toaster", "--server", NOWHERE),
        ExitCode.USAGE,
        "'--type'",
    ),
    "negative log entry": Case(
        ("log", "verify", "--entry", "-1", "--server", NOWHERE), ExitCode.USAGE, "'--entry'"
    ),
    "negative layer": Case(
        ("authorize", "image.pull", "image:x", "--layer", "-3", "--server", NOWHERE),
        ExitCode.USAGE,
        "'--layer'",
    ),
    "subject": Case(
        ("authorize", "image.pull", "image:x", "--subject", "nobody", "--server", NOWHERE),
        ExitCode.USAGE,
        "--subject 'nobody': give user:NAME or node:NAME",
    ),
    "secret reference": Case(
        ("secret", "show", "volume-7", "--server", NOWHERE),
        ExitCode.USAGE,
        "give the reference secret create printed",
    ),
    "workers": Case(
        ("server", "--data-dir", "{tmp}/data", "--workers", "0"),
        ExitCode.USAGE,
        "'--workers'",
        absent=("{tmp}/data",),
    ),
    # -- addresses ----------------------------------------------------------------------------
    "server without a scheme": Case(
        ("login", "--server", "127.0.0.1:8443", "--password-stdin"),
        ExitCode.USAGE,
        "--server '127.0.0.1:8443': give the control plane's URL, https://HOST:PORT",
    ),
    "kms without a scheme": Case(
        ("image", "decrypt", "oci:{encrypted}:v1", "oci:{tmp}/out", "--kms", "cp:8443"),
        ExitCode.USAGE,
        "--kms 'cp:8443'",
        absent=("{tmp}/out",),
    ),
    "server port out of range": Case(
        ("login", "--server", "https://127.0.0.1:99999", "--password-stdin"),
        ExitCode.USAGE,
        "https://HOST:PORT",
    ),
    "login without a terminal": Case(
        ("login", "--server", NOWHERE), ExitCode.USAGE, "pipe it in with --password-stdin"
    ),
    "control plane unreachable": Case(
        ("login", "--server", "https://127.0.0.1:{free}", "--password-stdin"),
        ExitCode.UNAVAILABLE,
        "unreachable",
        stdin="a password\n",
    ),
    "registry unreachable": Case(
        ("image", "inspect", "docker://127.0.0.1:{free}/nothing/here:1"),
        ExitCode.UNAVAILABLE,
        "unreachable",
    ),
    # -- files and directories ------------------------------------------------------------------
    "key into a missing directory": Case(
        ("key", "generate", "{tmp}/missing/alice"),
        ExitCode.NOT_FOUND,
        "directory {tmp}/missing does not exist",
        absent=("{tmp}/missing",),
    ),
    "key onto a directory": Case(
        ("key", "generate", "--out", "{dir}"),
        ExitCode.USAGE,
        "is a directory",
        absent=("{dir}.pub",),
    ),
    "key id of a directory": Case(("key", "id", "{dir}"), ExitCode.USAGE, "is a directory"),
    "key id of nothing": Case(("key", "id", "{tmp}/none.pub"), ExitCode.NOT_FOUND, "not exist"),
    "payload into a missing directory": Case(
        ("secret", "payload", UUID, "--out", "{tmp}/missing/key.bin", "--server", NOWHERE),
        ExitCode.NOT_FOUND,
        "--out {tmp}/missing/key.bin: directory {tmp}/missing does not exist",
    ),
    "payload onto a directory": Case(
        ("secret", "payload", UUID, "--out", "{dir}", "--server", NOWHERE),
        ExitCode.USAGE,
        "--out {dir} is a directory",
    ),
    "decryption key missing": Case(
        ("image", "decrypt", "oci:{encrypted}:v1", "oci:{tmp}/out:v1", "-k", "{tmp}/none.pem"),
        ExitCode.NOT_FOUND,
        "--key {tmp}/none.pem does not exist",
        absent=("{tmp}/out",),
    ),
    "decryption key is a directory": Case(
        ("image", "decrypt", "oci:{encrypted}:v1", "oci:{tmp}/out:v1", "-k", "{dir}"),
        ExitCode.USAGE,
        "is a directory",
        absent=("{tmp}/out",),
    ),
    "public key missing": Case(
        ("node", "register", "n1", "--public-key", "{tmp}/none.pub", "--server", NOWHERE),
        ExitCode.NOT_FOUND,
        "--public-key {tmp}/none.pub does not exist",
    ),
    "CA bundle not PEM": Case(
        (
            "image",
            "copy",
            "oci:{layout}:v1",
            "docker://127.0.0.1:9/x:1",
            "--dest-cacert",
            "{notpem}",
        ),
        ExitCode.MALFORMED,
        "--dest-cacert {notpem} holds no PEM certificate",
    ),
    "CA bundle missing": Case(
        ("image", "inspect", "docker://127.0.0.1:9/x:1", "--cacert", "{tmp}/none.pem"),
        ExitCode.NOT_FOUND,
        "--cacert {tmp}/none.pem does not exist",
    ),
    "control plane CA not PEM": Case(
        ("login", "--server", NOWHERE, "--ca", "{notpem}", "--password-stdin"),
        ExitCode.MALFORMED,
        "holds no PEM certificate",
        stdin="a password\n",
    ),
    "auth file missing": Case(
        ("image", "copy", "oci:{layout}:v1", "oci:{tmp}/out:v1", "--authfile", "{tmp}/auth.json"),
        ExitCode.NOT_FOUND,
        "--authfile {tmp}/auth.json does not exist",
        absent=("{tmp}/out",),
    ),
    "auth file not JSON": Case(
        ("image", "copy", "oci:{layout}:v1", "oci:{tmp}/out:v1", "--authfile", "{notpem}"),
        ExitCode.MALFORMED,
        "not a valid auth file",
        absent=("{tmp}/out",),
    ),
    "credentials without a colon": Case(
        ("image", "copy", "oci:{layout}:v1", "oci:{tmp}/out:v1", "--src-creds", "alice"),
        ExitCode.USAGE,
        "--src-creds: give USER:PASSWORD",
        absent=("{tmp}/out",),
    ),
    "layout onto a file": Case(
        ("image", "copy", "oci:{layout}:v1", "oci:{notpem}:v1"),
        ExitCode.USAGE,
        "exists and is not an OCI image layout",
    ),
    # -- recipients and keys --------------------------------------------------------------------
    "tier that is not a number": Case(
        (
            "image",
            "encrypt",
            "oci:{layout}:v1",
            "oci:{tmp}/out:v1",
            "-r",
            "jwe:{alice_pub}:tier=abc",
        ),
        ExitCode.USAGE,
        "tier='abc': give a layer index",
        absent=("{tmp}/out",),
    ),
    "negative tier": Case(
        (
            "image",
            "encrypt",
            "oci:{layout}:v1",
            "oci:{tmp}/out:v1",
            "-r",
            "jwe:{alice_pub}:tier=-1",
        ),
        ExitCode.USAGE,
        "give a layer index",
        absent=("{tmp}/out",),
    ),
    "unknown recipient option": Case(
        ("image", "encrypt", "oci:{layout}:v1", "oci:{tmp}/out:v1", "-r", "jwe:{alice_pub}:tear=1"),
        ExitCode.USAGE,
        "unknown option 'tear'",
        absent=("{tmp}/out",),
    ),
    "recipient key not PEM": Case(
        ("image", "encrypt", "oci:{layout}:v1", "oci:{tmp}/out:v1", "-r", "jwe:{notpem}"),
        ExitCode.MALFORMED,
        "not a PEM public key",
        absent=("{tmp}/out",),
    ),
    "a key that opens nothing": Case(
        ("image", "decrypt", "oci:{encrypted}:v1", "oci:{tmp}/out:v1", "-k", "{eve_pem}"),
        ExitCode.NO_KEY,
        "none of the given keys can open layer 1, its lowest encrypted layer",
        absent=("{tmp}/out",),
    ),
    "a key that opens nothing, no cut": Case(
        (
            "image",
            "decrypt",
            "oci:{encrypted}:v1",
            "oci:{tmp}/out:v1",
            "-k",
            "{eve_pem}",
            "--no-truncate",
        ),
        ExitCode.NO_KEY,
        "none of the given keys can open layer 1",
        absent=("{tmp}/out",),
    ),
    "a lower tier, no cut": Case(
        (
            "image",
            "decrypt",
            "oci:{encrypted}:v1",
            "oci:{tmp}/out:v1",
            "-k",
            "{bob_pem}",
            "--no-truncate",
        ),
        ExitCode.NO_KEY,
        "cannot open layer 2 of 3",
        absent=("{tmp}/out",),
    ),
    # -- the node: agent, run, gateway ------------------------------------------------------------
    "TCTI that is not installed": Case(
        (
            "agent",
            *NODE,
            "--tpm",
            "bogus:x",
            "--node-key",
            "{alice_pem}",
            "--state-dir",
            "{tmp}/st",
        ),
        ExitCode.USAGE,
        "--tpm 'bogus:x': no TCTI 'bogus' is installed",
        absent=("{tmp}/st",),
    ),
    "node key missing": Case(
        ("agent", *NODE, "--node-key", "{tmp}/none.pem", "--state-dir", "{tmp}/st"),
        ExitCode.NOT_FOUND,
        "--node-key {tmp}/none.pem does not exist",
        absent=("{tmp}/st",),
    ),
    "node key not PEM": Case(
        ("agent", *NODE, "--node-key", "{notpem}", "--state-dir", "{tmp}/st"),
        ExitCode.MALFORMED,
        "--node-key {notpem}: not an unencrypted PEM private key",
        absent=("{tmp}/st",),
    ),
    "state directory is a file": Case(
        ("agent", *NODE, "--node-key", "{alice_pem}", "--state-dir", "{notpem}"),
        ExitCode.USAGE,
        "--state-dir {notpem} exists and is not a directory",
    ),
    "gateway configuration missing": Case(
        (
            "agent",
            *NODE,
            "--node-key",
            "{alice_pem}",
            "--state-dir",
            "{tmp}/st",
            "--gateway-config",
            "{tmp}/gw.toml",
        ),
        ExitCode.NOT_FOUND,
        "--gateway-config {tmp}/gw.toml does not exist",
        absent=("{tmp}/st",),
    ),
    "key lease above its maximum": Case(
        (
            "volume-plugin",
            *NODE,
            "--node-key",
            "{alice_pem}",
            "--plugin-root",
            "{tmp}/root",
            "--plugin-socket",
            "{tmp}/p.sock",
            "--key-lease",
            "3601",
        ),
        ExitCode.USAGE,
        "--key-lease 3601: a key lease lasts more than 0 and at most 3600 seconds",
        absent=("{tmp}/root", "{tmp}/p.sock"),
    ),
    "run with its public key missing": Case(
        (
            "run",
            "docker://127.0.0.1:9/x:1",
            "--key",
            "{tmp}/none.pub",
            *NODE,
            "--node-key",
            "{alice_pem}",
        ),
        ExitCode.NOT_FOUND,
        "--key {tmp}/none.pub does not exist",
    ),
    "attestation interval below a second": Case(
        ("agent", *NODE, "--interval", "0", "--node-key", "{alice_pem}", "--state-dir", "{tmp}/st"),
        ExitCode.USAGE,
        "'--interval'",
        absent=("{tmp}/st",),
    ),
    "PCR out of range": Case(
        ("agent", *NODE, "--pcr", "24", "--node-key", "{alice_pem}", "--state-dir", "{tmp}/st"),
        ExitCode.USAGE,
        "'--pcr'",
        absent=("{tmp}/st",),
    ),
    "run with a TCTI that is not installed": Case(
        ("run", "docker://127.0.0.1:9/x:1", "--key", "{alice_pub}", *NODE, "--tpm", "bogus:x"),
        ExitCode.USAGE,
        "--tpm 'bogus:x'",
    ),
    "run with the node key missing": Case(
        ("run", "docker://127.0.0.1:9/x:1", "--key", "{alice_pub}", *NODE, "--node-key", "{tmp}/k"),
        ExitCode.NOT_FOUND,
        "--node-key {tmp}/k does not exist",
    ),
    "gateway node key missing": Case(
        ("gateway", *NODE, "--node-key", "{tmp}/none.pem", "--listen", "unix://{tmp}/gw.sock"),
        ExitCode.NOT_FOUND,
        "--node-key {tmp}/none.pem does not exist",
        absent=("{tmp}/gw.sock",),
    ),
    "gateway token file missing": Case(
        (
            "gateway",
            "--server",
            NOWHERE,
            "--token-file",
            "{tmp}/t",
            "--listen",
            "unix://{tmp}/gw.sock",
        ),
        ExitCode.NOT_FOUND,
        "--token-file {tmp}/t does not exist",
        absent=("{tmp}/gw.sock",),
    ),
    # -- the control plane's own start --------------------------------------------------------------
    "data directory is a file": Case(
        ("server", "--data-dir", "{notpem}"),
        ExitCode.USAGE,
        "--data-dir {notpem} exists and is not a directory",
    ),
    "listen port out of range": Case(
        ("server", "--data-dir", "{tmp}/data", "--listen", "127.0.0.1:99999"),
        ExitCode.USAGE,
        "a port is 1 to 65535",
        absent=("{tmp}/data",),
    ),
    "listen port in use": Case(
        ("server", "--data-dir", "{tmp}/data", "--listen", "127.0.0.1:{busy}"),
        ExitCode.UNAVAILABLE,
        "the port is in use",
        absent=("{tmp}/data",),
    ),
    "listen on an address of another host": Case(
        ("server", "--data-dir", "{tmp}/data", "--listen", "192.0.2.1:8443"),
        ExitCode.USAGE,
        "192.0.2.1 is not an address of this host",
        absent=("{tmp}/data",),
    ),
    "database not supported": Case(
        ("server", "--data-dir", "{tmp}/data", "--database-url", "mysql://db/trustplane"),
        ExitCode.USAGE,
        "database 'mysql' is not supported",
        absent=("{tmp}/data",),
    ),
    "demo work directory is a file": Case(
        ("demo", "--workdir", "{notpem}"), ExitCode.USAGE, "--workdir {notpem} exists"
    ),
}


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture
def values(material: dict[str, Path], busy_port: int, tmp_path: Path) -> dict[str, object]:
    return {**material, "tmp": tmp_path, "busy": busy_port, "free": free_port()}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_expected_failure_is_one_line_and_its_code(
    case: Case, values: dict[str, object], tmp_path: Path
) -> None:
    before = sorted(tmp_path.iterdir())
    result = run_cli(*(arg.format(**values) for arg in case.args), stdin=case.stdin)
    assert_one_line_error(result, case.code, case.text.format(**values))
    for path in case.absent:
        assert not Path(path.format(**values)).exists(), f"{path} was left behind"
    assert sorted(tmp_path.iterdir()) == before, "something was left in the working directory"


def test_a_lower_tier_gets_its_cut_and_is_told_which_layers_it_opened(
    material: dict[str, Path], tmp_path: Path
) -> None:
    """Bob's tier reaches layer 1: he gets layers 0..1 (a runnable image), exit 0,
    and one line saying what his key opened and where the image was cut."""
    result = run_cli(
        "image",
        "decrypt",
        f"oci:{material['encrypted']}:v1",
        f"oci:{tmp_path / 'bob'}:v1",
        "-k",
        str(material["bob_pem"]),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "the keys open encrypted layers [1], not layer 2: the image is cut to its first 2 of 3 "
        "layers"
    ]
    assert "(2 layers," in result.stdout


# -- a full disk, for real: a small tmpfs in a mount namespace of the command's own ------------

FULL_DISK = """
mount -t tmpfs -o size=256k tmpfs "$0" || exit 99
head -c 1M /dev/zero > "$0/fill" 2>/dev/null  # every further block is refused: ENOSPC
"$@"
code=$?
ls -A "$0" > "$0.left"
exit $code
"""


@dataclass(frozen=True)
class FullDiskCase:
    args: tuple[str, ...]
    text: str = "no space left on device"
    env: dict[str, str] = field(default_factory=dict)


FULL_DISK_CASES = {
    "key generate": FullDiskCase(("key", "generate", "{full}/alice"), "{full}/alice.pem: no space"),
    "signing key generate": FullDiskCase(
        ("key", "generate", "--signing", "{full}/release"),
        "{full}/release.key: no space",
        {"COSIGN_PASSWORD": "correct horse"},
    ),
    "image copy into a layout": FullDiskCase(
        ("image", "copy", "oci:{layout}:v1", "oci:{full}/copy:v1", "-q")
    ),
    "image decrypt into a layout": FullDiskCase(
        ("image", "decrypt", "oci:{encrypted}:v1", "oci:{full}/plain:v1", "-k", "{alice_pem}", "-q")
    ),
    "image encrypt into a layout": FullDiskCase(
        ("image", "encrypt", "oci:{layout}:v1", "oci:{full}/enc:v1", "-r", "jwe:{alice_pub}", "-q")
    ),
}


@pytest.mark.parametrize("case", FULL_DISK_CASES.values(), ids=FULL_DISK_CASES.keys())
def test_a_full_disk_is_one_line_and_leaves_nothing(
    case: FullDiskCase, material: dict[str, Path], tmp_path: Path
) -> None:
    """ENOSPC from a real file system (tmpfs, size 256 KiB, filled up), not a mock:
    exit 10 (storage), one line, and the file system holds only what it held."""
    full = tmp_path / "full"
    full.mkdir()
    values = {**material, "full": full}
    wrap = ("unshare", "--mount", "--propagation", "private", "sh", "-c", FULL_DISK, str(full))
    result = run_cli(*(arg.format(**values) for arg in case.args), wrap=wrap, env=case.env)
    assert result.returncode != 99, f"cannot mount a tmpfs here: {result.stderr}"
    assert_one_line_error(result, ExitCode.STORAGE, case.text.format(**values))
    assert (tmp_path / "full.left").read_text().split() == ["fill"]
