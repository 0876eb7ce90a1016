"""Which action a Docker Engine API call is, if any.

The seed (004) names five container actions: download an image, start,
delete, modify and stop; building an image is a sixth (`image.build`): a
build makes dockerd pull its FROM image and run each RUN step in a
container of its own, past the pull and create checks, so it is never
counted as a mere modification. Every call the gateway forwards is one of
them or read-only; anything else is denied (fail closed). `{id}` is one
path segment; `{image}` is one or more (image names contain `/`).

| method | path (after `/vX.Y`)                          | action            | body checked |
|--------|-----------------------------------------------|-------------------|--------------|
| GET/HEAD | /_ping                                      | read-only         |              |
| GET    | /version, /info, /events, /system/df          | read-only         |              |
| GET    | /containers/json, /containers/{id}/json,      | read-only         |              |
|        | …/{id}/top, logs, changes, stats              |                   |              |
| HEAD   | /containers/{id}/archive (stat a path)        | read-only         |              |
| POST   | /containers/{id}/wait, /containers/{id}/resize,| read-only        |              |
|        | /exec/{id}/resize, /auth                      |                   |              |
| GET    | /images/json, /images/search,                 | read-only         |              |
|        | /images/{image}/json, /images/{image}/history |                   |              |
| GET    | /volumes, /volumes/{id}, /networks,           | read-only         |              |
|        | /networks/{id}, /exec/{id}/json,              |                   |              |
|        | /distribution/{image}/json                    |                   |              |
| POST   | /images/create?fromImage=…                    | image.pull        | query        |
| POST   | /containers/create                            | container.start   | HostConfig   |
| POST   | /containers/{id}/start, restart, unpause      | container.start   |              |
| POST   | /containers/{id}/stop, kill, pause            | container.stop    |              |
| DELETE | /containers/{id}, /images/{image},            | container.delete  |              |
|        | /volumes/{id}, /networks/{id}                 |                   |              |
| POST   | /containers/prune, /images/prune,             | container.delete  |              |
|        | /volumes/prune, /networks/prune, /build/prune |                   |              |
| POST   | /containers/{id}/update                       | container.modify  | devices      |
| POST   | /containers/{id}/rename, attach, exec (create)| container.modify  | exec: Privileged |
| POST   | /exec/{id}/start                              | container.modify  |              |
| PUT    | /containers/{id}/archive (copy in)            | container.modify  |              |
| GET    | /containers/{id}/archive, /containers/{id}/export,| container.modify |           |
|        | /images/get, /images/{image}/get (content leaves) |              |              |
| POST   | /build                                        | image.build       | networkmode, tags |
| POST   | /commit, /images/load,                        | container.modify  |              |
|        | /images/create?fromSrc=… (import),            |                   |              |
|        | /images/{image}/tag, /images/{image}/push     |                   |              |
| POST   | /volumes/create, /networks/create,            | container.modify  | DriverOpts, Driver |
|        | /networks/{id}/connect, /networks/{id}/disconnect |               |              |
| any    | /session, /grpc, /swarm, /nodes, /services,   | denied            |              |
|        | /tasks, /secrets, /configs, /plugins,         |                   |              |
|        | /containers/{id}/attach/ws, anything else     |                   |              |

Calls that use a volume of the `trustplane` driver need the caller's
`volume.attach`, `volume.create` or `volume.delete` on it besides the
action above (volume_access.py).

A request body is refused unless the call takes one (`none` in the table
below): the start call of API versions before 1.24 took a HostConfig, so
those versions are refused too (request.py). Form bodies are refused for
every call (http1.check_content_type): Go's ParseForm would read their
fields as query parameters.

Reading a container's or an image's content out (`docker cp` from, `export`,
`save`) counts as `container.modify`: it is what an attacker with read
access would use to lift decrypted layers, so normal users are refused it.
Resizing a TTY and waiting for an exit change nothing and are read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trustplane.errors import MalformedError
from trustplane.gateway.request import Target

Action = Literal[
    "image.pull",
    "image.build",
    "container.start",
    "container.stop",
    "container.delete",
    "container.modify",
]
Kind = Literal["container", "image", "exec", "volume", "network", "system"]
BodyCheck = Literal["create", "exec", "update", "volume", "network", "build", "json", "none"]
"""`none`: the body must be empty; `json`: any JSON object; the others: see host_access."""


@dataclass(frozen=True)
class Classified:
    """What a call does: its action (None = read-only) and on what."""

    action: Action | None
    kind: Kind
    name: str | None = None
    """The container, image, exec, volume or network the path names."""
    body: BodyCheck = "none"
    hijack: bool = False
    """attach / exec start: the connection may be upgraded to a raw stream."""
    stream_body: bool = False
    """The request body is streamed to dockerd unread (build context, archives)."""

    @property
    def read_only(self) -> bool:
        return self.action is None


# (method, pattern, action, kind, body check, hijack, streamed body)
_Row = tuple[str, tuple[str, ...], Action | None, Kind, BodyCheck, bool, bool]
_R: None = None
START: Action = "container.start"
STOP: Action = "container.stop"
DELETE: Action = "container.delete"
MODIFY: Action = "container.modify"
PULL: Action = "image.pull"
BUILD: Action = "image.build"
CTR: Kind = "container"
_TABLE: tuple[_Row, ...] = (
    ("GET", ("_ping",), _R, "system", "none", False, False),
    ("HEAD", ("_ping",), _R, "system", "none", False, False),
    ("GET", ("version",), _R, "system", "none", False, False),
    ("GET", ("info",), _R, "system", "none", False, False),
    ("GET", ("events",), _R, "system", "none", False, False),
    ("GET", ("system", "df"), _R, "system", "none", False, False),
    ("POST", ("auth",), _R, "system", "json", False, False),
    # containers
    ("GET", ("containers", "json"), _R, CTR, "none", False, False),
    ("POST", ("containers", "create"), START, CTR, "create", False, False),
    ("POST", ("containers", "prune"), DELETE, "system", "none", False, False),
    ("GET", ("containers", "{id}", "json"), _R, CTR, "none", False, False),
    ("GET", ("containers", "{id}", "top"), _R, CTR, "none", False, False),
    ("GET", ("containers", "{id}", "logs"), _R, CTR, "none", False, False),
    ("GET", ("containers", "{id}", "changes"), _R, CTR, "none", False, False),
    ("GET", ("containers", "{id}", "stats"), _R, CTR, "none", False, False),
    ("HEAD", ("containers", "{id}", "archive"), _R, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "wait"), _R, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "resize"), _R, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "start"), START, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "restart"), START, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "unpause"), START, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "stop"), STOP, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "kill"), STOP, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "pause"), STOP, CTR, "none", False, False),
    ("DELETE", ("containers", "{id}"), DELETE, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "update"), MODIFY, CTR, "update", False, False),
    ("POST", ("containers", "{id}", "rename"), MODIFY, CTR, "none", False, False),
    ("POST", ("containers", "{id}", "attach"), MODIFY, CTR, "none", True, False),
    ("POST", ("containers", "{id}", "exec"), MODIFY, CTR, "exec", False, False),
    ("PUT", ("containers", "{id}", "archive"), MODIFY, CTR, "none", False, True),
    ("GET", ("containers", "{id}", "archive"), MODIFY, CTR, "none", False, False),
    ("GET", ("containers", "{id}", "export"), MODIFY, CTR, "none", False, False),
    ("POST", ("commit",), MODIFY, CTR, "json", False, False),
    # exec instances
    ("GET", ("exec", "{id}", "json"), _R, "exec", "none", False, False),
    ("POST", ("exec", "{id}", "resize"), _R, "exec", "none", False, False),
    ("POST", ("exec", "{id}", "start"), MODIFY, "exec", "json", True, False),
    # images
    ("GET", ("images", "json"), _R, "image", "none", False, False),
    ("GET", ("images", "search"), _R, "image", "none", False, False),
    ("POST", ("images", "create"), PULL, "image", "none", False, True),
    ("POST", ("images", "load"), MODIFY, "image", "none", False, True),
    ("GET", ("images", "get"), MODIFY, "image", "none", False, False),
    ("POST", ("images", "prune"), DELETE, "system", "none", False, False),
    ("POST", ("build",), BUILD, "image", "build", False, True),
    ("POST", ("build", "prune"), DELETE, "system", "none", False, False),
    ("GET", ("images", "{image}", "json"), _R, "image", "none", False, False),
    ("GET", ("images", "{image}", "history"), _R, "image", "none", False, False),
    ("GET", ("images", "{image}", "get"), MODIFY, "image", "none", False, False),
    ("POST", ("images", "{image}", "tag"), MODIFY, "image", "none", False, False),
    ("POST", ("images", "{image}", "push"), MODIFY, "image", "none", False, False),
    ("DELETE", ("images", "{image}"), DELETE, "image", "none", False, False),
    ("GET", ("distribution", "{image}", "json"), _R, "image", "none", False, False),
    # volumes and networks
    ("GET", ("volumes",), _R, "volume", "none", False, False),
    ("POST", ("volumes", "create"), MODIFY, "volume", "volume", False, False),
    ("POST", ("volumes", "prune"), DELETE, "system", "none", False, False),
    ("GET", ("volumes", "{id}"), _R, "volume", "none", False, False),
    ("DELETE", ("volumes", "{id}"), DELETE, "volume", "none", False, False),
    ("GET", ("networks",), _R, "network", "none", False, False),
    ("POST", ("networks", "create"), MODIFY, "network", "network", False, False),
    ("POST", ("networks", "prune"), DELETE, "system", "none", False, False),
    ("GET", ("networks", "{id}"), _R, "network", "none", False, False),
    ("DELETE", ("networks", "{id}"), DELETE, "network", "none", False, False),
    ("POST", ("networks", "{id}", "connect"), MODIFY, "network", "json", False, False),
    ("POST", ("networks", "{id}", "disconnect"), MODIFY, "network", "json", False, False),
)  # fmt: skip


def classify(target: Target) -> Classified:
    """The action of a parsed call; MalformedError (deny) when it is not in the table."""
    for method, pattern, action, kind, body, hijack, stream in _TABLE:
        if method != target.method:
            continue
        name = _match(pattern, target.segments)
        if name is False or name is True:
            continue
        if target.segments[:2] == ("images", "create"):
            return _images_create(target)
        return Classified(action, kind, name or None, body, hijack, stream)
    raise MalformedError(f"{target.method} {target.path} is not allowed through the gateway")


def _match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> str | bool | None:
    """None when matched without a name, the name when matched, False when not matched."""
    if "{image}" in pattern:
        at = pattern.index("{image}")
        after = len(pattern) - at - 1
        if len(segments) < len(pattern) or segments[:at] != pattern[:at]:
            return False
        if after and segments[len(segments) - after :] != pattern[at + 1 :]:
            return False
        return "/".join(segments[at : len(segments) - after])
    if len(pattern) != len(segments):
        return False
    name: str | None = None
    for want, got in zip(pattern, segments, strict=True):
        if want == "{id}":
            name = got
        elif want != got:
            return False
    return name


def _images_create(target: Target) -> Classified:
    """`fromImage` pulls (image.pull); `fromSrc` imports a tarball (modify); both: refused."""
    from_image = target.one("fromImage")
    from_src = target.one("fromSrc")
    if (from_image is None) == (from_src is None):
        raise MalformedError("/images/create needs exactly one of fromImage and fromSrc")
    if from_image is not None:
        if not from_image:
            raise MalformedError("fromImage is empty")
        tag = target.one("tag")
        if tag:
            separator = "@" if tag.startswith("sha256:") else ":"
            from_image = f"{from_image}{separator}{tag}"
        # The pull body is empty; a body here is not what the CLI sends.
        return Classified("image.pull", "image", from_image, "none", False, False)
    repo = target.one("repo")
    return Classified("container.modify", "image", repo or None, "none", False, True)
