"""The gateway's decision for one request, in the seed's order.

1. The caller: a token (`X-Trustplane-Token`) the control plane vouches for
   and has not revoked (revocations.py, checked beside the whoami cache);
   the local user behind the socket (SO_PEERCRED) is logged with it, and
   must be one of `--allowed-uid` when the gateway names any. A token
   scoped to gateways must name this one; an unscoped token is refused
   when the gateway requires scoped tokens.
2. The action (actions.py); a call not in the table is denied.
3. Read-only calls are allowed for any verified caller (the verified
   identity is the short-lived cached decision).
4. A caller of normal privilege (role `user`, or a node) is refused every
   mutating action here; `operator` and `admin` go on. A container start
   is refused while the resource monitor that must watch it is blind
   (monitor.py), unless the gateway allows that.
5. The body: host access (host_access.py) unless this gateway allows it.
6. The container metadata (id, name, image, process id) from dockerd, and
   a running container's current resource use (monitor.py's readers).
7. Image authentication (image_auth.py) for pulls and starts, with their
   signatures (image_signatures.py).
8. Operation authorization: the control plane's explicit `allow`. A build
   (`image.build`) is authorized on the one repository it tags.
9. Trustplane volumes the call uses: the caller's own `allow` for each
   (`volume.attach`, `volume.create`, `volume.delete`; volume_access.py).

Any exception on the way is a denial: fail closed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from trustplane.errors import (
    AuthError,
    Forbidden,
    MalformedError,
    NotFoundError,
    TrustplaneError,
)
from trustplane.gateway.actions import Classified, classify
from trustplane.gateway.control_link import Caller, ControlLink
from trustplane.gateway.docker_api import DockerApi
from trustplane.gateway.host_access import host_access
from trustplane.gateway.image_auth import ImageAuthenticator, looks_like_id, reference_name
from trustplane.gateway.image_signatures import SignatureCheck
from trustplane.gateway.monitor import ResourceMonitor
from trustplane.gateway.reporter import Reporter
from trustplane.gateway.request import Target
from trustplane.gateway.revocations import RevocationWatch
from trustplane.gateway.volume_access import (
    DRIVER,
    container_volumes,
    create_volumes,
    volume_name,
)

TOKEN_HEADER = "x-trustplane-token"  # noqa: S105 - a header name
SUPER_ROLES = frozenset({"operator", "admin"})
USAGE_FIELDS = frozenset(
    {"pid", "cpu_percent", "cpu_seconds", "memory_percent", "memory_bytes", "memory_limit"}
)
"""The container's process and resource use, reported with a refusal about it."""
log = logging.getLogger("trustplane.gateway")


@dataclass(frozen=True)
class Peer:
    """The local process on the other end of the socket (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass
class Verdict:
    allowed: bool
    status: int
    message: str
    classified: Classified | None = None
    caller: Caller | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    image_id: str | None = None
    """For a create: the image id that was authenticated (see confirm_created)."""
    logged: bool = False
    """The control plane logged this decision itself (`/v1/authorize`)."""
    volume_checks: list[tuple[str, str]] = field(default_factory=list)
    """(action, `volume:NAME`) the caller needs besides the call's own (volume_access.py)."""
    volumes: set[str] = field(default_factory=set)
    """For a create: the trustplane volumes the caller was allowed to attach."""


def _status(error: TrustplaneError) -> int:
    """The status of a refusal, from the error table (errors.py), in the Docker
    Engine API's terms: it answers bad input with 400 (it has no 422), and a
    refusal is never a server error except "unavailable" (fail closed: 403)."""
    status = error.http_status
    if status == 422:
        return 400
    if status >= 500 and status != 503:
        return 403
    return status


class Gatekeeper:
    def __init__(
        self,
        link: ControlLink,
        docker: DockerApi,
        allow_host_access: frozenset[str] = frozenset(),
        allowed_uids: frozenset[int] = frozenset(),
        reporter: Reporter | None = None,
        signatures: SignatureCheck | None = None,
        require_scoped_tokens: bool = False,
        monitor: ResourceMonitor | None = None,
        revocations: RevocationWatch | None = None,
    ) -> None:
        self.revocations = revocations
        """Tokens revoked at the control plane, learnt every second."""
        self.monitor = monitor
        """Reads a container's resource use for the decision's metadata."""
        self.link = link
        self.reporter = reporter
        """Refusals made here go to the control plane's log through it (never waited on)."""
        self.docker = docker
        self.images = ImageAuthenticator(link, docker, signatures)
        self.require_scoped_tokens = require_scoped_tokens
        self.allow_host_access = allow_host_access
        self.allowed_uids = allowed_uids
        """Local users (SO_PEERCRED uid) who may use the socket at all; empty: any."""

    async def decide(
        self,
        target: Target,
        tokens: list[str],
        body: bytes,
        peer: Peer | None,
        classified: Classified | None = None,
    ) -> Verdict:
        """Allow or deny; never raises (an unexpected error denies).

        `classified` is classify(target) when the caller has it already.
        """
        verdict = Verdict(False, 403, "denied")
        try:
            if self.allowed_uids and (peer is None or peer.uid not in self.allowed_uids):
                uid = "unknown" if peer is None else str(peer.uid)
                raise Forbidden(f"trustplane gateway: local user {uid} may not use this gateway")
            await self._decide(verdict, target, tokens, body, classified)
        except TrustplaneError as exc:
            verdict.allowed, verdict.status, verdict.message = False, _status(exc), str(exc)
        except Exception as exc:  # fail closed on anything unexpected
            log.exception("gateway: unexpected error while deciding")
            verdict.allowed, verdict.status = False, 403
            verdict.message = f"the gateway could not decide ({type(exc).__name__}); denied"
        who = verdict.caller.subject if verdict.caller else "?"
        action = (verdict.classified.action or "read") if verdict.classified else "?"
        # Read-only allows are the bulk of the traffic (`docker ps` polling):
        # DEBUG, so that formatting a line for each does not cost a tenth of
        # the proxy's CPU. Every change and every denial stays at INFO.
        level = logging.DEBUG if verdict.allowed and action == "read" else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s %s %s %s peer=%s %s: %s",
                "allow" if verdict.allowed else "deny",
                who,
                action,
                target.path[:200],
                f"{peer.uid}/{peer.pid}" if peer else "?",
                verdict.metadata or "",
                verdict.message,
            )
        if not verdict.allowed and not verdict.logged:
            self.report_refusal(
                verdict.status,
                verdict.message,
                peer,
                path=target.path,
                method=target.method,
                subject=verdict.caller.subject if verdict.caller else None,
                action=action,
                container=str(verdict.metadata.get("name") or verdict.metadata.get("id") or "")
                or None,
                image=str(verdict.metadata["image"]) if "image" in verdict.metadata else None,
                usage={k: v for k, v in verdict.metadata.items() if k in USAGE_FIELDS},
            )
        return verdict

    def health(self, peer: Peer | None) -> tuple[int, dict[str, Any]]:
        """The gateway's own state for `GET /_trustplane/health`: (status, document).

        No token is asked (health probes have none, and it must answer when
        the control plane does not); it tells whether the gateway can do its
        job, never what runs on it.
        """
        if self.allowed_uids and (peer is None or peer.uid not in self.allowed_uids):
            uid = "unknown" if peer is None else str(peer.uid)
            return 403, {"message": f"trustplane gateway: local user {uid} may not use it"}
        monitor = self.monitor.health() if self.monitor is not None else None
        revocations = None
        if self.revocations is not None:
            revocations = {"fresh": self.revocations.fresh(), "epoch": self.revocations.epoch}
        degraded = (monitor is not None and bool(monitor["blind"])) or (
            revocations is not None and not revocations["fresh"]
        )
        reports = None
        if self.reporter is not None:
            reports = {
                "sent": self.reporter.sent,
                "queued": self.reporter.queued,
                "dropped": self.reporter.dropped,
            }
        document = {
            "status": "degraded" if degraded else "ok",
            "monitor": monitor,
            "revocations": revocations,
            "reports": reports,
        }
        return (503 if degraded else 200), document

    def report_refusal(
        self,
        status: int,
        message: str,
        peer: Peer | None,
        *,
        path: str | None = None,
        method: str | None = None,
        subject: str | None = None,
        action: str | None = None,
        container: str | None = None,
        image: str | None = None,
        usage: dict[str, Any] | None = None,
    ) -> None:
        """Queue a `gateway.decision` report of a refusal (the refusal is already made).

        A refusal the control plane itself gave (`/v1/authorize`) is in its
        log already, and is not reported twice.
        """
        if self.reporter is None:
            return
        self.reporter.report(
            "gateway.decision",
            {
                "decision": "deny",
                "status": status,
                "reason": message,
                "method": method,
                "path": path[:256] if path else None,
                "subject": subject,
                "action": action,
                "container": container,
                "image": image,
                "peer_uid": peer.uid if peer else None,
                "peer_pid": peer.pid if peer else None,
                **(usage or {}),
            },
        )

    async def _decide(
        self,
        verdict: Verdict,
        target: Target,
        tokens: list[str],
        body: bytes,
        classified: Classified | None,
    ) -> None:
        if len(tokens) != 1 or not tokens[0]:
            raise AuthError(
                "trustplane gateway: send exactly one X-Trustplane-Token header "
                '(docker: "HttpHeaders" in ~/.docker/config.json)'
            )
        watch = self.revocations
        caller = await self.link.whoami(tokens[0], cached_ok=watch is None or watch.fresh())
        if watch is not None:
            watch.check(caller)
        verdict.caller = caller
        await self._check_token_scope(caller)
        if classified is None:
            classified = classify(target)  # raises for a call not in the table
        verdict.classified = classified
        if not classified.stream_body:
            wanted, document = host_access(classified.body, target, body)
        else:
            wanted, document = host_access(classified.body, target, b"")
        if classified.action is None:
            if target.method == "HEAD" and target.segments[-1:] == ("archive",) and classified.name:
                await self._stat_volumes(caller, verdict, classified.name)
            verdict.allowed, verdict.status, verdict.message = True, 200, "read-only"
            return
        action = classified.action
        if caller.role not in SUPER_ROLES:
            raise Forbidden(
                f"trustplane gateway: {caller.subject} has normal privilege (role "
                f"{caller.role}); {action} needs an operator or admin"
            )
        if action == "container.start" and self.monitor is not None:
            self.monitor.refuse_start_if_blind()
        refused = wanted - self.allow_host_access
        if refused:
            raise Forbidden(
                f"trustplane gateway: {', '.join(sorted(refused))} access to the host is "
                "refused on this gateway"
            )
        resource = await self._resource(verdict, target, classified, document)
        context: dict[str, str | int | float | bool | None] = {
            k: v for k, v in verdict.metadata.items() if isinstance(v, str | int | float)
        }
        allowed, reason = await self.link.authorize(caller, action, resource, context)
        if not allowed:
            verdict.logged = True
            raise Forbidden(
                f"trustplane gateway: the control plane refuses {action} on {resource}: {reason}"
            )
        for volume_action, volume in dict.fromkeys(verdict.volume_checks):
            # The volume plugin gets the key as the node: the caller must be allowed it too.
            allowed, why = await self.link.authorize(caller, volume_action, volume, context)
            if not allowed:
                verdict.logged = True
                raise Forbidden(
                    f"trustplane gateway: the control plane refuses {volume_action} on "
                    f"{volume}: {why}"
                )
        verdict.allowed, verdict.status = True, 200
        verdict.message = f"{action} on {resource}: {reason}"

    async def _check_token_scope(self, caller: Caller) -> None:
        """The token must be valid on this gateway: scoped to it, or unscoped if allowed."""
        if caller.gateways is None:
            if self.require_scoped_tokens:
                raise AuthError(
                    "trustplane gateway: this gateway accepts only tokens scoped to it "
                    "(log in for this gateway)"
                )
            return
        here = await self.link.own_name()
        if here not in caller.gateways:
            raise AuthError(
                f"trustplane gateway {here}: the token is scoped to "
                f"{', '.join(sorted(caller.gateways)) or 'no gateway'}, not this gateway"
            )

    async def _resource(
        self, verdict: Verdict, target: Target, classified: Classified, document: dict[str, Any]
    ) -> str:
        """What the action is on (`image:REPO`, `container:NAME`, ...), authenticated."""
        name = classified.name
        if classified.action == "image.pull":
            assert name is not None
            return f"image:{await self.images.for_pull(name)}"
        if classified.action == "image.build":
            return f"image:{_build_repository(target)}"
        if classified.body == "create":
            image = document.get("image")
            if not isinstance(image, str) or not image:
                raise MalformedError("a container needs an Image")
            repository, image_id = await self.images.for_start(image)
            verdict.metadata["image"] = image
            verdict.image_id = image_id
            await self._create_volumes(verdict, document)
            return f"image:{repository}"
        if classified.kind == "exec" and name is not None:
            exec_info = await self.docker.inspect("exec", name)
            if exec_info is None:
                raise NotFoundError(f"No such exec instance: {name}")
            name = str(exec_info.get("ContainerID", ""))
            if not name:
                raise MalformedError("dockerd names no container for this exec instance")
        if classified.kind in ("container", "exec") and name is not None:
            return await self._container(verdict, name, classified.action)
        if classified.kind == "image" and name is not None:
            return f"image:{await self._image_repository(name)}"
        if classified.kind == "volume" or target.segments == ("volumes", "prune"):
            await self._volume_call(verdict, classified, name, document, target)
            if classified.kind == "system":
                return "container:*"
        if classified.kind in ("volume", "network"):
            label = name or str(document.get("name", "")) or "*"
            return f"{classified.kind}:{label}"
        if classified.kind == "image":
            tags = target.query.get("t") or target.query.get("repo") or []
            return f"image:{reference_name(tags[0])[0]}" if tags and tags[0] else "image:*"
        return "container:*"

    async def _stat_volumes(self, caller: Caller, verdict: Verdict, name: str) -> None:
        """A path stat in a stopped container mounts its volumes: `volume.attach` for each."""
        container = await self.docker.inspect("containers", name)
        for volume in container_volumes(container or {}):
            allowed, why = await self.link.authorize(caller, "volume.attach", f"volume:{volume}")
            if not allowed:
                verdict.logged = True
                raise Forbidden(
                    f"trustplane gateway: the control plane refuses volume.attach on "
                    f"volume:{volume}: {why}"
                )

    async def _create_volumes(self, verdict: Verdict, document: dict[str, Any]) -> None:
        """A create's trustplane volumes: `volume.attach` (and `volume.create` for a new one)."""
        for volume, drivers in create_volumes(document).items():
            driver = await self.docker.volume_driver(volume)
            if driver is None and DRIVER in drivers:
                # dockerd would create it with the plugin: a new volume, made and opened.
                verdict.volume_checks.append(("volume.create", f"volume:{volume}"))
            elif driver != DRIVER:
                continue
            verdict.volume_checks.append(("volume.attach", f"volume:{volume}"))
            verdict.volumes.add(volume)

    async def _volume_call(
        self,
        verdict: Verdict,
        classified: Classified,
        name: str | None,
        document: dict[str, Any],
        target: Target,
    ) -> None:
        """Volume create, delete and prune: what they need on trustplane volumes."""
        if target.segments == ("volumes", "prune"):
            verdict.volume_checks.append(("volume.delete", "volume:*"))
        elif classified.action == "container.delete" and name is not None:
            if await self.docker.volume_driver(volume_name(name)) == DRIVER:
                verdict.volume_checks.append(("volume.delete", f"volume:{name}"))
        elif target.segments == ("volumes", "create"):
            driver = document.get("driver")
            if driver == DRIVER:
                label = document.get("name")
                if not isinstance(label, str) or not label:
                    raise Forbidden("trustplane gateway: a trustplane volume needs a name")
                verdict.volume_checks.append(("volume.create", f"volume:{volume_name(label)}"))

    async def _container(self, verdict: Verdict, name: str, action: str | None) -> str:
        container = await self.docker.inspect("containers", name)
        if container is None:
            raise NotFoundError(f"No such container: {name}")
        state = container.get("State")
        config = container.get("Config")
        container_name = str(container.get("Name", "")).lstrip("/")
        image = str(config.get("Image", "")) if isinstance(config, dict) else ""
        pid = state.get("Pid") if isinstance(state, dict) else None
        verdict.metadata.update(
            id=str(container.get("Id", ""))[:12], name=container_name, image=image, pid=pid
        )
        if self.monitor is not None and isinstance(pid, int) and pid > 0:
            verdict.metadata.update(await self.monitor.usage(str(container.get("Id", "")), pid))
        if action in ("container.start", "container.modify"):
            # Starting mounts its volumes, and exec/cp/export read them: the
            # caller must be allowed each trustplane volume it mounts.
            verdict.volume_checks.extend(
                ("volume.attach", f"volume:{volume}") for volume in container_volumes(container)
            )
        if action == "container.start":
            # Re-authenticate the image the container was made from: a container
            # created behind the gateway's back must not start through it.
            await self.images.for_start(str(container.get("Image", "")))
        return f"container:{container_name or name}"

    async def _image_repository(self, name: str) -> str:
        """The repository an image reference names; for an id, the image's first tag's."""
        if looks_like_id(name):
            image = await self.docker.inspect("images", name)
            tags = image.get("RepoTags") if image else None
            if isinstance(tags, list) and tags and isinstance(tags[0], str):
                return reference_name(tags[0])[0]
            return name.removeprefix("sha256:")  # an untagged image is named by its id
        return reference_name(name)[0]

    async def confirm_created(self, verdict: Verdict, answer: bytes) -> bool:
        """After dockerd created a container: is it made from the image that was checked,
        with no trustplane volume that was not authorized (verdict.message says why not)?

        dockerd resolves the image name again when it creates; a tag moved in
        between would run an image nobody authenticated. A container made
        from anything else is removed at once, and the create is denied.
        """
        container_id = ""
        try:
            document = json.loads(answer)
            container_id = str(document["Id"]) if isinstance(document, dict) else ""
            if not container_id or not container_id.isalnum():
                raise MalformedError("dockerd's create answer names no container")
            container = await self.docker.inspect("containers", container_id)
            if container is not None and container.get("Image") == verdict.image_id:
                unchecked = set(container_volumes(container)) - verdict.volumes
                if not unchecked:
                    return True
                verdict.message = (
                    "trustplane gateway: the container mounts trustplane volumes that were "
                    f"not authorized: {', '.join(sorted(unchecked))[:200]}"
                )
                log.warning("gateway: %s", verdict.message)
                await self.docker.remove_container(container_id)
                return False
        except Exception:  # fail closed: remove what cannot be confirmed
            log.exception("gateway: cannot confirm a created container")
        if container_id.isalnum():
            await self.docker.remove_container(container_id)
        log.warning("gateway: removed container %s: not from the checked image", container_id)
        verdict.message = "trustplane gateway: the image changed between its check and the create"
        return False


def _build_repository(target: Target) -> str:
    """The one repository a build tags (`t`, repeatable); `*` for an untagged build.

    One build is one decision: tags into two repositories would let a rule
    for one of them write the other, so they are refused.
    """
    repositories = {reference_name(tag)[0] for tag in target.query.get("t", []) if tag}
    if len(repositories) > 1:
        raise Forbidden(
            "trustplane gateway: a build may tag one repository only "
            f"({', '.join(sorted(repositories))[:200]})"
        )
    return repositories.pop() if repositories else "*"
