"""The policy engine: deny by default, explicit denies win, tiers, validation, reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trustplane.control.identity import Principal
from trustplane.control.policy import DEFAULT_POLICY, PolicyFile, parse_policy
from trustplane.errors import MalformedError

ALICE = Principal("user", "alice", "user", frozenset())
OPERATOR = Principal("user", "olga", "operator", frozenset())
ADMIN = Principal("user", "ada", "admin", frozenset())
GATEWAY = Principal("node", "gw-7", "node", frozenset())

POLICY = """
version: 1
rules:
  - roles: [operator]
    actions: ["container.*", image.pull]
    resources: ["*"]
  - subjects: ["node:gw-*"]
    actions: [key.release]
    resources: ["image:shop/*"]
    max_layer: 1
  - subjects: ["user:alice"]
    actions: [key.release]
    resources: ["image:shop/app"]
    max_layer: 0
  - subjects: ["user:alice"]
    actions: [key.release]
    resources: ["image:shop/app"]
    max_layer: 2
  - effect: deny
    roles: [operator]
    actions: [container.delete]
    resources: ["container:prod-*"]
"""


def test_deny_by_default_and_glob_matching() -> None:
    policy = parse_policy(POLICY, "test")
    assert policy.decide(OPERATOR, "container.start", "container:web").allowed
    assert not policy.decide(ALICE, "container.start", "container:web").allowed
    assert "no rule allows user:alice" in policy.decide(ALICE, "image.pull", "image:x").reason
    assert policy.decide(
        GATEWAY, "key.release", "image:shop/deep/path", layer=0
    ).allowed  # * crosses /


def test_explicit_deny_wins() -> None:
    policy = parse_policy(POLICY, "test")
    assert policy.decide(OPERATOR, "container.delete", "container:test-1").allowed
    decision = policy.decide(OPERATOR, "container.delete", "container:prod-1")
    assert not decision.allowed
    assert decision.reason == "denied by rule 5"


def test_tiers_bound_layer_keys() -> None:
    policy = parse_policy(POLICY, "test")
    assert policy.decide(GATEWAY, "key.release", "image:shop/app", layer=1).allowed
    refused = policy.decide(GATEWAY, "key.release", "image:shop/app", layer=2)
    assert not refused.allowed
    assert "above every tier" in refused.reason
    # Of several matching rules, the most generous tier applies.
    assert policy.decide(ALICE, "key.release", "image:shop/app", layer=2).allowed
    assert not policy.decide(ALICE, "key.release", "image:shop/app", layer=3).allowed


def test_unknown_actions_are_never_allowed() -> None:
    policy = parse_policy(
        "version: 1\nrules:\n  - roles: [admin]\n    actions: ['*']\n    resources: ['*']\n", "t"
    )
    admin = Principal("user", "root", "admin", frozenset())
    assert policy.decide(admin, "container.start", "x").allowed
    assert not policy.decide(admin, "rm.rf", "x").allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 2\nrules: []\n", "version: 1"),
        ("version: 1\nrules: {}\n", "must be a list"),
        (
            "version: 1\nrules:\n  - actions: [image.pull]\n    resources: ['*']\n",
            "no roles and no subjects",
        ),
        (
            "version: 1\nrules:\n  - roles: [king]\n    actions: [image.pull]\n    resources: ['*']\n",
            "unknown roles",
        ),
        (
            "version: 1\nrules:\n  - roles: [user]\n    actions: [image.pul]\n    resources: ['*']\n",
            "matches no known action",
        ),
        ("version: 1\nrules:\n  - roles: [user]\n    actions: [image.pull]\n", "resources must be"),
        (
            "version: 1\nrules:\n  - roles: [user]\n    actions: [image.pull]\n    resources: ['*']\n    max_layer: -1\n",
            "max_layer",
        ),
        (
            "version: 1\nrules:\n  - roles: [user]\n    actions: [image.pull]\n    resources: ['*']\n    when: now\n",
            "unknown keys",
        ),
        (
            "version: 1\nrules:\n  - effect: maybe\n    roles: [user]\n    actions: [image.pull]\n    resources: ['*']\n",
            "allow or deny",
        ),
        ("[unclosed", "not valid YAML"),
    ],
)
def test_mistakes_are_refused_with_the_rule_number(text: str, message: str) -> None:
    with pytest.raises(MalformedError, match=message):
        parse_policy(text, "policy.yaml")


def test_default_policy_is_valid_and_sensible() -> None:
    policy = parse_policy(DEFAULT_POLICY, "default")
    assert not policy.decide(ALICE, "container.start", "container:web").allowed
    assert policy.decide(OPERATOR, "container.start", "container:web").allowed
    assert not policy.decide(OPERATOR, "user.manage", "user:x").allowed
    # Building through a gateway runs unchecked steps: no default rule grants it.
    assert policy.decide(OPERATOR, "image.pull", "image:shop/app").allowed
    assert not policy.decide(OPERATOR, "image.build", "image:shop/app").allowed
    assert policy.decide(ADMIN, "image.build", "image:shop/app").allowed


def test_file_reloads_at_once_and_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    loaded = PolicyFile(path)
    assert path.read_text() == DEFAULT_POLICY  # written at first start
    assert not loaded.current().decide(ALICE, "container.stop", "container:db").allowed
    path.write_text(
        POLICY
        + "  - subjects: ['user:alice']\n    actions: [container.stop]\n    resources: ['*']\n"
    )
    _touch(path)
    assert loaded.current().decide(ALICE, "container.stop", "container:db").allowed
    path.write_text("version: 1\nrules: [oops\n")
    _touch(path)
    assert loaded.current().decide(ALICE, "container.stop", "container:db").allowed
    assert loaded.error is not None
    assert "keeping the last good policy" in loaded.error
    path.write_text(DEFAULT_POLICY)
    _touch(path)
    assert not loaded.current().decide(ALICE, "container.stop", "container:db").allowed
    assert loaded.error is None


def _touch(path: Path) -> None:
    """Make sure the modification time moves even on coarse clocks."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_require_attestation_is_carried_by_the_allowing_rule() -> None:
    policy = parse_policy(
        """
version: 1
rules:
  - subjects: ["node:edge-*"]
    actions: [key.release]
    resources: ["image:*"]
    require_attestation: true
  - roles: [operator]
    actions: [key.release]
    resources: ["image:*"]
""",
        "test",
    )
    node = Principal(kind="node", name="edge-1", role="node", scopes=frozenset())
    operator = Principal(kind="user", name="op", role="operator", scopes=frozenset())
    assert policy.decide(node, "key.release", "image:shop/app", 1).require_attestation
    assert not policy.decide(operator, "key.release", "image:shop/app", 1).require_attestation
    with pytest.raises(MalformedError, match="require_attestation must be true or false"):
        parse_policy(
            "version: 1\nrules:\n  - roles: [node]\n    actions: [key.release]\n"
            "    resources: ['*']\n    require_attestation: 'yes'\n",
            "test",
        )


def test_attestation_required_by_any_granting_rule_is_not_bypassed_by_a_broader_one() -> None:
    policy = parse_policy(
        """
version: 1
rules:
  - roles: [node]
    actions: [key.release]
    resources: ["*"]
  - roles: [node]
    actions: [key.release]
    resources: ["image:shop/*"]
    require_attestation: true
""",
        "test",
    )
    node = Principal("node", "gw-1", "node", frozenset())
    guarded = policy.decide(node, "key.release", "image:shop/app", 0)
    assert guarded.allowed
    assert guarded.require_attestation
    elsewhere = policy.decide(node, "key.release", "image:other/app", 0)
    assert elsewhere.allowed
    assert not elsewhere.require_attestation
