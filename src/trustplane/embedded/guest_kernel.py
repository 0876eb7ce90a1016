"""The Debian cloud kernel for test guests, fetched once per machine, never installed.

`linux-image-cloud-amd64` is a metapackage; it depends on the versioned
image package (`linux-image-6.1.0-N-cloud-amd64`) that holds `vmlinuz` and
the modules. Both names come from the local apt lists, so a machine whose
kernel is already cached never touches the network again. The package has
no `modules.dep` and the host has no `depmod`: module load order comes from
each `.ko`'s own `depends=` field (its `.modinfo` section).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trustplane.embedded.debian_packages import cache_root, fetch_unpacked, package_info
from trustplane.errors import UnavailableError
from trustplane.tools import Executor

METAPACKAGE = "linux-image-cloud-amd64"

# In `.modinfo` every field is a NUL-terminated "key=value" string.
_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked kernel: the image to boot and its module tree."""

    release: str
    """`uname -r` inside the guest, e.g. `6.1.0-57-cloud-amd64`."""
    vmlinuz: Path
    modules_dir: Path
    """`lib/modules/<release>`."""

    def builtin(self) -> set[str]:
        """Names of the modules compiled into the kernel (no .ko to load)."""
        listing = self.modules_dir / "modules.builtin"
        names = set()
        for line in listing.read_text().splitlines():
            names.add(module_name(Path(line.strip())))
        return names

    def module_files(self) -> dict[str, Path]:
        """Every loadable module by its name (`dm_crypt`, not `dm-crypt.ko`)."""
        return {module_name(p): p for p in (self.modules_dir / "kernel").rglob("*.ko")}

    def load_order(self, names: Iterable[str]) -> list[Path]:
        """The `.ko` files to insmod, dependencies first, for modules `names`.

        Built-in modules are skipped; an unknown name is an error (a guest
        without dm-crypt must not boot as if it had it).
        """
        files = self.module_files()
        builtin = self.builtin()
        order: list[Path] = []
        state: dict[str, str] = {}

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in builtin or state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise UnavailableError(f"module dependency cycle: {' -> '.join((*chain, name))}")
            path = files.get(name)
            if path is None:
                raise UnavailableError(f"kernel {self.release} has no module {name}")
            state[name] = "visiting"
            for dependency in module_depends(path):
                visit(dependency, (*chain, name))
            state[name] = "done"
            order.append(path)

        for name in names:
            visit(module_name(Path(name)), ())
        return order


def module_name(path: Path) -> str:
    """A module's name as the kernel spells it: `dm-crypt.ko` -> `dm_crypt`."""
    stem = path.name
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        stem = stem.removesuffix(suffix)
    return stem.replace("-", "_")


def module_depends(path: Path) -> list[str]:
    """The `depends=` field of an (uncompressed) `.ko`."""
    match = _DEPENDS.search(path.read_bytes())
    if match is None:
        raise UnavailableError(f"{path.name} has no depends= field (is it compressed?)")
    return [module_name(Path(name.decode())) for name in match.group(1).split(b",") if name]


def guest_kernel(executor: Executor | None = None, *, refresh: bool = False) -> GuestKernel:
    """The cloud kernel: fetched on first use, then taken from the cache.

    A cached kernel is used without asking apt (whose lists take a second to
    read); `refresh=True` looks up the current candidate and fetches it if
    it is newer than what is cached.
    """
    cached = _newest_cached()
    if cached is not None and not refresh:
        return _kernel_in(cached)
    executor = executor or Executor()
    meta = package_info(METAPACKAGE, executor)
    image = next((d for d in meta.depends if d.startswith("linux-image-")), None)
    if image is None:
        raise UnavailableError(f"{METAPACKAGE} {meta.version} names no kernel image package")
    # The metapackage pins its image package to its own version.
    tree = fetch_unpacked(
        [f"{image}={meta.version}"], key=f"{image}_{meta.version}", executor=executor
    )
    return _kernel_in(tree)


def _newest_cached() -> Path | None:
    """The most recently fetched kernel in the cache, if any."""
    complete = (cache_root() / "debs").glob("linux-image-*/.complete")
    newest = max(complete, key=lambda marker: marker.stat().st_mtime, default=None)
    return newest.parent if newest is not None else None


def _kernel_in(tree: Path) -> GuestKernel:
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if not images:
        raise UnavailableError(f"no vmlinuz in {tree / 'boot'}")
    release = images[-1].name.removeprefix("vmlinuz-")
    modules_dir = tree / "lib" / "modules" / release
    if not modules_dir.is_dir():
        raise UnavailableError(f"no modules for {release} in {tree}")
    return GuestKernel(release, images[-1], modules_dir)
