"""Runtime integrity: re-measure the image files of running containers.

For each running container the agent finds the registered image it was made
from: the image's layer diff_ids (`RootFS.Layers`) must equal, in order, the
diff_ids of an image registered under one of its names (RepoTags,
RepoDigests, the name it was run by; tag and digest stripped), and that
registration must carry file digests for every layer. Containers of other
images are not measured.

What is measured is the image as the container sees it, without its
writable layer. With Docker's overlay2 driver, `GraphDriver.Data.LowerDir`
lists the image's layer directories (top first, after the container's
`-init` layer, which Docker writes and is skipped like the writable
`UpperDir`); each is compared with its own layer's reference, so a file
changed, removed or added under any image layer is found, including a change
made from the host. With any other storage driver the layers cannot be told
apart from the writable layer honestly: such a container is reported as
unmeasurable (fail closed) instead of being passed.

Each drift (or unmeasurable container) is reported to the control plane,
whose policy answers `stop` or `keep`; on `stop` the agent stops the
container through the Engine API. A drift that is kept is found again at
every round: it is still reported (the policy's answer may change), but
with the log entry of the same finding (`repeat_of`), so the control plane
logs it once per change of what was found, and the agent logs it locally
only then too. What was logged is remembered in memory: after an agent
restart a standing drift is logged once more.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors

from trustplane.api.images import ImageEntry
from trustplane.api.runtime import DriftCounts, DriftReport
from trustplane.client import ControlClient
from trustplane.errors import (
    Forbidden,
    NotFoundError,
    TrustplaneError,
    UnavailableError,
    UsageError,
)
from trustplane.oci.reference import canonical
from trustplane.trust.file_digests import FileDrift, compare, measure_tree

logger = logging.getLogger("trustplane.agent.runtime")
MAX_REPORTED = 100
"""Paths per list sent to the control plane (the counts say how many in all)."""

Status = Literal["clean", "drift", "unmeasured", "unregistered"]


@dataclass(frozen=True)
class Reference:
    repository: str
    manifest_digest: str
    diff_ids: tuple[str, ...]
    files: tuple[dict[str, str], ...] = field(repr=False)
    """Per layer, bottom first."""


@dataclass(frozen=True)
class ContainerCheck:
    """One container's result in one round."""

    container: str
    name: str
    status: Status
    reason: str = ""
    repository: str | None = None
    drift: FileDrift = field(default_factory=FileDrift)
    action: str | None = None
    """The control plane's answer to a report: stop or keep."""
    stopped: bool = False
    log_index: int | None = None
    repeated: bool = False
    """The same finding and answer as at an earlier round: nothing new was logged."""


class RuntimeIntegrity:
    """Re-measures running containers against registered file digests, one round at a time."""

    def __init__(self, docker_url: str, stop_grace: int = 5) -> None:
        try:
            self.docker = docker.APIClient(base_url=docker_url, version="auto", timeout=60)
        except docker.errors.DockerException as exc:
            raise UnavailableError(f"Docker engine at {docker_url}: {exc}") from None
        self.docker_url = docker_url
        self.stop_grace = stop_grace
        self._references: dict[tuple[str, str], Reference] = {}
        """Registered references never change: cached for the agent's life."""
        self._logged: dict[str, tuple[str, int]] = {}
        """Per container: the fingerprint of its last logged finding and that entry's index."""

    def close(self) -> None:
        self.docker.close()

    def check(self, control: ControlClient) -> list[ContainerCheck]:
        """One round over every running container."""
        try:
            running = self.docker.containers(filters={"status": "running"})
        except (docker.errors.DockerException, OSError) as exc:
            raise UnavailableError(f"Docker engine at {self.docker_url}: {exc}") from None
        listings: dict[str, list[ImageEntry]] = {}
        measured: dict[str, dict[str, str]] = {}
        results = []
        for summary in running:
            try:
                result = self._check_one(control, str(summary["Id"]), listings, measured)
            except NotFoundError:
                continue  # the container went away during the round
            except TrustplaneError as exc:
                # One container's failure (the control plane briefly away) does not
                # end the round; its drift, if any, is found again at the next one.
                logger.error("runtime check of container %s failed: %s", summary["Id"][:12], exc)
                continue
            if result is not None:
                results.append(result)
        # A container that ended or is clean again starts afresh: its next finding
        # is logged as new. One that could not be checked this round keeps its own.
        running_ids = {str(summary["Id"]) for summary in running}
        clean = {r.container for r in results if r.status not in ("drift", "unmeasured")}
        self._logged = {
            c: logged for c, logged in self._logged.items() if c in running_ids and c not in clean
        }
        return results

    def _check_one(
        self,
        control: ControlClient,
        container_id: str,
        listings: dict[str, list[ImageEntry]],
        measured: dict[str, dict[str, str]],
    ) -> ContainerCheck | None:
        attrs = self._inspect("container", container_id)
        name = str(attrs.get("Name") or "").lstrip("/")
        if not (attrs.get("State") or {}).get("Running"):
            return None
        image = self._inspect("image", str(attrs.get("Image")))
        diff_ids = tuple(str(d) for d in (image.get("RootFS") or {}).get("Layers") or ())
        names = [
            *(image.get("RepoTags") or ()),
            *(image.get("RepoDigests") or ()),
            str((attrs.get("Config") or {}).get("Image") or ""),
        ]
        reference = self._reference(control, _repositories(names), diff_ids, listings)
        if reference is None:
            return ContainerCheck(container_id, name, "unregistered", "no registered file digests")
        try:
            drift = self._measure(attrs, reference, measured)
            result = ContainerCheck(
                container_id,
                name,
                "clean" if drift.clean else "drift",
                repository=reference.repository,
                drift=drift,
            )
        except _Unmeasurable as exc:
            result = ContainerCheck(
                container_id, name, "unmeasured", str(exc), repository=reference.repository
            )
        if result.status == "clean":
            return result
        return self._report(control, result, reference)

    def _inspect(self, kind: str, name: str) -> dict[str, Any]:
        try:
            if kind == "container":
                document = self.docker.inspect_container(name)
            else:
                document = self.docker.inspect_image(name)
        except docker.errors.NotFound:
            raise NotFoundError(f"{kind} {name} is gone") from None
        except (docker.errors.DockerException, OSError) as exc:
            raise UnavailableError(f"Docker engine at {self.docker_url}: {exc}") from None
        if not isinstance(document, dict):
            raise UnavailableError(f"Docker engine sent an unexpected {kind} inspect answer")
        return document

    def _reference(
        self,
        control: ControlClient,
        repositories: Sequence[str],
        diff_ids: tuple[str, ...],
        listings: dict[str, list[ImageEntry]],
    ) -> Reference | None:
        for repository in repositories:
            if repository not in listings:
                try:
                    listings[repository] = control.images(repository)
                except (Forbidden, NotFoundError):
                    listings[repository] = []
            for record in listings[repository]:
                layers = sorted(record.layers, key=lambda layer: layer.index)
                if tuple(str(layer.diff_id) for layer in layers) != diff_ids:
                    continue
                reference = self._files(control, repository, record.manifest_digest)
                if reference is not None:
                    return reference
        return None

    def _files(self, control: ControlClient, repository: str, manifest: str) -> Reference | None:
        """The complete reference of one image; asked again while it has none
        (file digests may be added to an image registered before)."""
        key = (repository, manifest)
        if key not in self._references:
            try:
                answer = control.image_files(repository, manifest)
            except (Forbidden, NotFoundError):
                return None
            layers = sorted(answer.layers, key=lambda layer: layer.index)
            files = [layer.files for layer in layers]
            if not layers or any(f is None for f in files):
                return None
            self._references[key] = Reference(
                repository,
                manifest,
                tuple(str(layer.diff_id) for layer in layers),
                tuple(dict(f or {}) for f in files),
            )
        return self._references[key]

    def _measure(
        self, attrs: dict[str, Any], reference: Reference, measured: dict[str, dict[str, str]]
    ) -> FileDrift:
        layer_dirs = image_layer_dirs(attrs)
        if len(layer_dirs) != len(reference.files):
            raise _Unmeasurable(
                f"the container has {len(layer_dirs)} image layer directories, "
                f"the registered image {len(reference.files)} layers"
            )
        changed: set[str] = set()
        missing: set[str] = set()
        unexpected: set[str] = set()
        for directory, files in zip(layer_dirs, reference.files, strict=True):
            key = str(directory)
            if key not in measured:
                try:
                    measured[key] = measure_tree(directory)
                except OSError as exc:
                    raise _Unmeasurable(f"cannot read {directory}: {exc.strerror}") from None
            drift = compare(files, measured[key])
            changed.update(drift.changed)
            missing.update(drift.missing)
            unexpected.update(drift.unexpected)
        return FileDrift(tuple(sorted(changed)), tuple(sorted(missing)), tuple(sorted(unexpected)))

    def _report(
        self, control: ControlClient, result: ContainerCheck, reference: Reference
    ) -> ContainerCheck:
        drift = result.drift
        fingerprint = _fingerprint(result, reference)
        previous = self._logged.get(result.container)
        repeat_of = previous[1] if previous is not None and previous[0] == fingerprint else None
        answer = control.report_drift(
            DriftReport.model_construct(
                container=result.container,
                name=result.name or None,
                repository=reference.repository,
                manifest_digest=reference.manifest_digest,
                changed=list(drift.changed[:MAX_REPORTED]),
                missing=list(drift.missing[:MAX_REPORTED]),
                unexpected=list(drift.unexpected[:MAX_REPORTED]),
                counts=DriftCounts.model_construct(
                    changed=len(drift.changed),
                    missing=len(drift.missing),
                    unexpected=len(drift.unexpected),
                ),
                reason=result.reason or None,
                fingerprint=fingerprint,
                repeat_of=repeat_of,
            )
        )
        action = answer.action
        repeated = answer.repeated
        self._logged[result.container] = (fingerprint, answer.log_index)
        logger.log(
            logging.DEBUG if repeated else logging.WARNING,
            "container %s (%s, image %s): %s: %d changed, %d missing, %d unexpected%s; %s",
            result.name,
            result.container[:12],
            reference.repository,
            result.status,
            len(drift.changed),
            len(drift.missing),
            len(drift.unexpected),
            f" ({result.reason})" if result.reason else "",
            "as logged before" if repeated else f"logged at {answer.log_index}",
        )
        stopped = False
        if action == "stop":
            try:
                self.docker.stop(result.container, timeout=self.stop_grace)
                stopped = True
                logger.warning("stopped container %s: %s", result.name, answer.reason)
            except docker.errors.NotFound:
                stopped = True  # already gone
            except (docker.errors.DockerException, OSError) as exc:
                logger.error("could not stop container %s: %s", result.name, exc)
        return ContainerCheck(
            result.container,
            result.name,
            result.status,
            result.reason,
            result.repository,
            drift,
            action,
            stopped,
            answer.log_index,
            repeated,
        )


class _Unmeasurable(TrustplaneError):
    """The container's image layers cannot be told apart on this node."""


def _fingerprint(result: ContainerCheck, reference: Reference) -> str:
    """sha256 of everything a round found in one container (every path, not only
    the MAX_REPORTED sent), to tell a standing drift from a changed one."""
    found = {
        "status": result.status,
        "reason": result.reason,
        "image": [reference.repository, reference.manifest_digest],
        "changed": result.drift.changed,
        "missing": result.drift.missing,
        "unexpected": result.drift.unexpected,
    }
    return hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()


def image_layer_dirs(attrs: dict[str, Any]) -> list[Path]:
    """The container's image layer directories, bottom first (overlay2 only)."""
    driver = attrs.get("GraphDriver") or {}
    if driver.get("Name") != "overlay2":
        raise _Unmeasurable(
            f"storage driver {driver.get('Name')!r}: only overlay2 keeps image layers apart"
        )
    lower = str((driver.get("Data") or {}).get("LowerDir") or "")
    dirs = [Path(d) for d in lower.split(":") if d]
    if not dirs:
        raise _Unmeasurable("overlay2 lists no image layer directory")
    if dirs[0].parent.name.endswith("-init"):
        dirs = dirs[1:]
    if any(not d.is_absolute() or d.parent.name.endswith("-init") for d in dirs):
        raise _Unmeasurable("overlay2 lists an unexpected layer directory")
    return dirs[::-1]


def _repositories(names: Sequence[str]) -> list[str]:
    """Distinct canonical repository names (oci/reference.py) of dockerd's tags and digests."""
    found: list[str] = []
    for name in names:
        try:
            repository = canonical(name)
        except UsageError:
            continue  # "<none>:<none>", an id, or a name we cannot read
        if repository not in found:
            found.append(repository)
    return found
