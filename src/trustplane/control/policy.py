"""Authorization policy: declarative YAML, deny by default, reloaded live.

    version: 1
    rules:
      - roles: [operator]                 # or subjects: ["node:gw-*", "user:alice"]
        actions: [image.pull, "container.*"]
        resources: ["image:shop/*"]
        max_layer: 1                      # only for image layer keys: tiers 0..1
        require_attestation: true         # key.release only to freshly attested nodes
      - effect: deny
        subjects: ["user:mallory"]
        actions: ["*"]
        resources: ["*"]
    runtime:
      stop_on_drift: ["image:shop/*"]     # or true / false (the default)

A request is allowed when some `allow` rule matches it and no `deny` rule
does. Patterns are shell globs where `*` also crosses `/`. Actions are
checked against the known set when the file is loaded, so a typo is an
error, not a rule that silently never matches.

The file is re-read when its modification time changes. A file that no
longer parses leaves the last good policy in force and is reported (in
/healthz and the metrics) until it is fixed: an operator's typo must not
open everything, nor lock everyone out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import yaml

from trustplane.control.identity import ROLES, Principal
from trustplane.errors import MalformedError

ACTIONS = frozenset(
    {
        # the seed's five container actions, and building an image
        "image.pull",
        "image.build",
        "container.start",
        "container.delete",
        "container.modify",
        "container.stop",
        # the control plane's own
        "key.release",
        "volume.attach",
        "volume.create",
        "volume.delete",
        "volume.type.create",
        "image.publish",
        "secret.create",
        "secret.delete",
        "recipient.create",
        "node.register",
        "node.clear",
        "user.manage",
        "kek.rotate",
        "log.read",
    }
)

DEFAULT_POLICY = """\
# trustplane authorization policy. Deny by default; explicit deny rules win.
# Edit freely: the server reloads this file when it changes.
# image.build (docker build through a gateway: its RUN steps and FROM pulls
# pass no start or pull check) is granted by no rule below; allow it per
# repository, e.g. roles: [operator], actions: [image.build],
# resources: ["image:shop/*"].
# volume.attach (the release of a volume's key to the host that attaches it)
# is granted to operators; give it to a compute node by name, e.g.
# subjects: ["node:compute-1"], actions: [volume.attach],
# resources: ["volume:*"], require_attestation: true.
version: 1
rules:
  - roles: [admin]
    actions: ["*"]
    resources: ["*"]
  - roles: [operator]
    actions: [image.pull, image.publish, "container.*", key.release, volume.attach,
              volume.create, volume.delete, secret.create, secret.delete, recipient.create,
              node.register, log.read]
    resources: ["*"]
  - roles: [user]
    actions: [image.pull, secret.create, volume.create, volume.delete, log.read]
    resources: ["*"]
  - roles: [user]
    actions: [key.release]
    resources: ["secret:*"]
  - roles: [node]
    actions: [image.pull, log.read]
    resources: ["*"]
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    require_attestation: bool = False
    """The allowing rule releases keys only to freshly attested nodes."""


@dataclass(frozen=True)
class Rule:
    effect: Literal["allow", "deny"]
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    roles: frozenset[str] = frozenset()
    subjects: tuple[str, ...] = ()
    max_layer: int | None = None
    require_attestation: bool = False
    number: int = 0

    def matches(self, principal: Principal, action: str, resource: str) -> bool:
        who = principal.role in self.roles or any(
            fnmatchcase(principal.subject, pattern) for pattern in self.subjects
        )
        return (
            who
            and any(fnmatchcase(action, pattern) for pattern in self.actions)
            and any(fnmatchcase(resource, pattern) for pattern in self.resources)
        )


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    stop_on_drift: tuple[str, ...] = ()
    """Resource globs (`image:REPO`) whose containers a node stops when their
    image files drift from the registered digests (runtime integrity)."""

    def stops_on_drift(self, repository: str) -> bool:
        resource = f"image:{repository}"
        return any(fnmatchcase(resource, pattern) for pattern in self.stop_on_drift)

    def decide(
        self, principal: Principal, action: str, resource: str, layer: int | None = None
    ) -> Decision:
        if action not in ACTIONS:
            return Decision(False, f"unknown action {action!r}")
        matching = [rule for rule in self.rules if rule.matches(principal, action, resource)]
        for rule in matching:
            if rule.effect == "deny":
                return Decision(False, f"denied by rule {rule.number}")
        granting = [
            rule
            for rule in matching
            if layer is None or rule.max_layer is None or layer <= rule.max_layer
        ]
        if granting:
            # Attestation, like a deny, is not overridden by a broader rule:
            # if any rule that grants this asks for it, it is required.
            required = any(rule.require_attestation for rule in granting)
            return Decision(True, f"allowed by rule {granting[0].number}", required)
        if layer is not None and matching:
            return Decision(
                False, f"layer {layer} is above every tier granted to {principal.subject}"
            )
        return Decision(False, f"no rule allows {principal.subject} to {action} {resource}")


def parse_policy(text: str, source: str) -> Policy:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MalformedError(f"{source}: not valid YAML ({exc})") from None
    if not isinstance(document, dict) or document.get("version") != 1:
        raise MalformedError(f"{source}: expected a mapping with `version: 1` and `rules`")
    rules = document.get("rules")
    if not isinstance(rules, list):
        raise MalformedError(f"{source}: `rules` must be a list")
    return Policy(
        tuple(_rule(raw, number, source) for number, raw in enumerate(rules, 1)),
        _stop_on_drift(document.get("runtime"), source),
    )


def _stop_on_drift(raw: Any, source: str) -> tuple[str, ...]:
    """`runtime: {stop_on_drift: true | false | [globs]}`; absent means false."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or set(raw) - {"stop_on_drift"}:
        raise MalformedError(f"{source}: runtime must be a mapping with only stop_on_drift")
    value = raw.get("stop_on_drift", False)
    if isinstance(value, bool):
        return ("*",) if value else ()
    return tuple(_strings(value, f"{source}: runtime.stop_on_drift"))


def _rule(raw: Any, number: int, source: str) -> Rule:
    where = f"{source}: rule {number}"
    if not isinstance(raw, dict):
        raise MalformedError(f"{where}: must be a mapping")
    unknown = set(raw) - {
        "effect",
        "roles",
        "subjects",
        "actions",
        "resources",
        "max_layer",
        "require_attestation",
    }
    if unknown:
        raise MalformedError(f"{where}: unknown keys {sorted(unknown)}")
    effect = raw.get("effect", "allow")
    if effect not in ("allow", "deny"):
        raise MalformedError(f"{where}: effect must be allow or deny")
    roles = _strings(raw["roles"], f"{where}: roles") if "roles" in raw else []
    if bad := set(roles) - set(ROLES):
        raise MalformedError(f"{where}: unknown roles {sorted(bad)}")
    subjects = _strings(raw["subjects"], f"{where}: subjects") if "subjects" in raw else []
    if not roles and not subjects:
        raise MalformedError(f"{where}: names no roles and no subjects")
    actions = _strings(raw.get("actions"), f"{where}: actions")
    for pattern in actions:
        if not any(fnmatchcase(action, pattern) for action in ACTIONS):
            raise MalformedError(f"{where}: action {pattern!r} matches no known action")
    resources = _strings(raw.get("resources"), f"{where}: resources")
    max_layer = raw.get("max_layer")
    if max_layer is not None and (not isinstance(max_layer, int) or max_layer < 0):
        raise MalformedError(f"{where}: max_layer must be a non-negative integer")
    require_attestation = raw.get("require_attestation", False)
    if not isinstance(require_attestation, bool):
        raise MalformedError(f"{where}: require_attestation must be true or false")
    return Rule(
        effect=effect,
        actions=tuple(actions),
        resources=tuple(resources),
        roles=frozenset(roles),
        subjects=tuple(subjects),
        max_layer=max_layer,
        require_attestation=require_attestation,
        number=number,
    )


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise MalformedError(f"{where} must be a non-empty list of strings")
    return value


@dataclass
class PolicyFile:
    """The policy on disk, re-read when it changes; the last good one rules."""

    path: Path
    policy: Policy = field(init=False)
    error: str | None = field(default=None, init=False)
    _mtime: float = field(default=-1.0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        if not self.path.exists():
            self.path.write_text(DEFAULT_POLICY)
        self.policy = parse_policy(self.path.read_text(), str(self.path))
        self._mtime = self.path.stat().st_mtime_ns

    def current(self) -> Policy:
        """The policy in force, re-read if the file changed.

        The file is checked at every decision (one stat, a few microseconds):
        a rule saved a moment ago applies to the very next request.
        """
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime_ns
            except OSError as exc:
                self.error = f"{self.path}: {exc.strerror}; keeping the last good policy"
                return self.policy
            if mtime != self._mtime:
                self._mtime = mtime
                try:
                    self.policy = parse_policy(self.path.read_text(), str(self.path))
                    self.error = None
                except (MalformedError, OSError) as exc:
                    self.error = f"{exc}; keeping the last good policy"
        return self.policy
