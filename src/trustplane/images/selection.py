"""Which layers are sensitive: `--layers all | 0,2,-1 | path:GLOB`.

`path:GLOB` names files instead of layer numbers: a layer is selected when it
adds or changes a file (anything but a directory or a whiteout) whose
absolute path matches GLOB (`**` crosses directories, `*` and `?` do not,
`{a,b}` alternates, and dotfiles match). Reading a layer to list its files
also checks its digest, so the choice rests on the layer that will be
encrypted, not on whatever a registry sent the first time. Paths are matched
as the layer writes them: a file reached through a symlink made in another
layer (`/data -> /secrets`, then `/data/key`) is matched as `/data/key`.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO

from wcmatch import glob

from trustplane.errors import UsageError
from trustplane.images.layer_scan import scan_layer
from trustplane.oci.model import Descriptor
from trustplane.oci.transport import ImageSource

GLOB_FLAGS = glob.GLOBSTAR | glob.DOTGLOB | glob.BRACE
WHITEOUT = ".wh."


@dataclass(frozen=True)
class LayerSelector:
    everything: bool = False
    indexes: tuple[int, ...] = ()
    patterns: tuple[str, ...] = ()

    @classmethod
    def all(cls) -> LayerSelector:
        return cls(everything=True)

    @classmethod
    def parse(cls, specs: Sequence[str]) -> LayerSelector:
        """Union of the given `--layers` values; none means all."""
        everything, indexes, patterns = not specs, [], []
        for spec in specs:
            if spec == "all":
                everything = True
            elif spec.startswith("path:"):
                pattern = spec[5:]
                if not pattern:
                    raise UsageError("--layers path: needs a glob, e.g. path:/secrets/**")
                patterns.append(pattern if pattern.startswith("/") else "/" + pattern)
            else:
                try:
                    indexes += [int(part) for part in spec.split(",")]
                except ValueError:
                    raise UsageError(
                        f"--layers {spec!r}: use all, indexes like 0,2,-1, or path:GLOB"
                    ) from None
        return cls(everything, tuple(indexes), tuple(patterns))

    def select(
        self,
        layers: Sequence[Descriptor],
        source: ImageSource,
        progress: Callable[[int], object] | None = None,
    ) -> set[int]:
        count = len(layers)
        if self.everything:
            return set(range(count))
        chosen = set()
        for index in self.indexes:
            if not -count <= index < count:
                raise UsageError(f"--layers: index {index} is out of range for {count} layers")
            chosen.add(index % count)
        if self.patterns:
            for index, layer in enumerate(layers):
                if index not in chosen and not layer.is_encrypted:
                    files = layer_files(source, layer, progress)
                    if any(glob.globmatch(f, self.patterns, flags=GLOB_FLAGS) for f in files):
                        chosen.add(index)
        return chosen


def layer_files(
    source: ImageSource, layer: Descriptor, progress: Callable[[int], object] | None = None
) -> list[str]:
    """Absolute paths of the non-directory, non-whiteout entries of a layer."""

    def read(stream: IO[bytes]) -> list[str]:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            return list(_paths(archive))

    return scan_layer(source, layer, read, progress)


def _paths(archive: tarfile.TarFile) -> Iterable[str]:
    for member in archive:
        # lstrip: normpath keeps a leading "//" (POSIX), and an absolute member
        # name unpacks to the same place as a relative one.
        name = posixpath.normpath("/" + member.name.lstrip("/"))
        if member.isdir() or posixpath.basename(name).startswith(WHITEOUT):
            continue
        yield name
