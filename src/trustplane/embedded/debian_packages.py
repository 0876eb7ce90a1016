"""Debian packages fetched and unpacked for a guest, never installed on the host.

The test guest needs a kernel with device-mapper and, on hosts that lack
them, `lvm2`'s and `dmsetup`'s binaries. Installing a kernel package (or
LVM, whose services act on the host's disks) on a shared machine would be
wrong; `apt-get download` + `dpkg-deb -x` gives the files and changes
nothing else. Downloads land in a cache outside the repository that
survives between runs (`/var/cache/trustplane-guest`, or
`$TRUSTPLANE_GUEST_CACHE`), keyed by package and version, filled under a
lock so that parallel test sessions fetch once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from trustplane.errors import TrustplaneError, UnavailableError
from trustplane.tools import Executor

SYSTEM_CACHE = Path("/var/cache/trustplane-guest")
_APT_TIMEOUT = 600.0
_DEPENDS_NAME = re.compile(r"^\s*([a-z0-9][a-z0-9.+-]*)")


def cache_root() -> Path:
    """Where fetched packages are kept: $TRUSTPLANE_GUEST_CACHE, the system cache, or ~/.cache."""
    configured = os.environ.get("TRUSTPLANE_GUEST_CACHE")
    if configured:
        root = Path(configured)
    elif os.geteuid() == 0 or os.access(SYSTEM_CACHE, os.W_OK):
        root = SYSTEM_CACHE
    else:
        root = Path.home() / ".cache" / "trustplane-guest"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def cache_lock(root: Path) -> Iterator[None]:
    """Serialise fetches into `root` across processes (parallel test sessions)."""
    with (root / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class PackageInfo:
    """A package as the local apt lists describe it (no network)."""

    name: str
    version: str
    depends: tuple[str, ...]
    """Names of the packages it depends on (first alternative of each)."""


def package_info(name: str, executor: Executor | None = None) -> PackageInfo:
    """Candidate version and dependencies of `name` from the local apt lists."""
    executor = executor or Executor()
    try:
        text = executor.run(["apt-cache", "show", "--no-all-versions", name], timeout=60).text
    except TrustplaneError as exc:
        raise UnavailableError(
            f"Debian package {name} is not in the apt lists (run apt-get update): {exc}"
        ) from exc
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" ") and key in {"Version", "Depends", "Pre-Depends"}:
            fields.setdefault(key, value.strip())
    if "Version" not in fields:
        raise UnavailableError(f"Debian package {name} is not in the apt lists (apt-get update)")
    depends = []
    for key in ("Pre-Depends", "Depends"):
        for clause in fields.get(key, "").split(","):
            match = _DEPENDS_NAME.match(clause.split("|")[0])
            if match:
                depends.append(match.group(1))
    return PackageInfo(name, fields["Version"], tuple(depends))


def is_installed(name: str, executor: Executor | None = None) -> bool:
    """True when the host has package `name` installed."""
    result = (executor or Executor()).run(
        ["dpkg-query", "-W", "-f=${Status}", name], check=False, timeout=60
    )
    return result.returncode == 0 and result.text.endswith("install ok installed")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def fetch_unpacked(
    packages: Sequence[str], key: str | None = None, executor: Executor | None = None
) -> Path:
    """Download `packages` (each `name` or `name=version`) and unpack them into one tree.

    The tree is cached under `cache_root()/debs/<key>`; `key` defaults to
    the packages and their candidate versions, so a newer package in the
    apt lists is fetched once and reused afterwards. Returns the tree's root.
    """
    executor = executor or Executor()
    if key is None:
        parts = []
        for spec in packages:
            name, _, version = spec.partition("=")
            parts.append(f"{name}_{version or package_info(name, executor).version}")
        key = "+".join(parts)
    root = cache_root()
    target = root / "debs" / _safe(key)
    if (target / ".complete").exists():
        return target
    with cache_lock(root):
        if (target / ".complete").exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
            debs = Path(scratch) / "debs"
            tree = Path(scratch) / "tree"
            debs.mkdir()
            tree.mkdir()
            # As root apt drops to the _apt user to download, which cannot write here.
            executor.run(
                ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *packages],
                cwd=debs,
                timeout=_APT_TIMEOUT,
            )
            for deb in sorted(debs.glob("*.deb")):
                executor.run(["dpkg-deb", "-x", str(deb), str(tree)], timeout=_APT_TIMEOUT)
            (tree / ".complete").write_text("\n".join(packages) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            tree.rename(target)
    return target
