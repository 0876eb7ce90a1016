"""A token revoked at the control plane is refused at the gateway within its poll.

The gateway caches who a token belongs to, so most calls never reach the
control plane; revocations reach it through `GET /v1/auth/revocations`,
which it asks every second (no MQTT involved here). The waits below poll
until the refusal appears, bounded by the test's timeout only: no timing is
asserted.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from control_helpers import Cli, entries_since, log_size
from gateway_helpers import DockerCli, RunningGateway, make_people, restart_gateway, start_gateway

from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.errors import AuthError, Forbidden, MalformedError


def refused_soon(cli: DockerCli) -> subprocess.CompletedProcess[str]:
    """`docker ps` until the gateway refuses it (the pytest timeout bounds the wait)."""
    while True:
        result = cli("ps")
        if result.returncode != 0:
            return result
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_a_revoked_token_is_refused_by_the_gateway_and_never_served_again(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    admin: ControlClient,
) -> None:
    crew = make_people(control_plane, "revoke")
    gateways = start_gateway(tmp_path / "gw-revoke", control_plane, docker_daemon)
    gateway = next(gateways)
    restarted: RunningGateway | None = None
    operator = DockerCli.make(gateway.host, tmp_path / "op", crew.operator_token)
    user = DockerCli.make(gateway.host, tmp_path / "user", crew.user_token)
    try:
        start = log_size(control_plane)
        operator.ok("ps")  # the gateway now has this token's caller in its cache
        user.ok("ps")
        answer = admin.revoke(token=crew.operator_token)
        assert answer.revoked == f"a token of user:{crew.operator}"

        result = refused_soon(operator)
        assert "revoked" in result.stderr, result.stderr
        # Learnt from the revocation list, which is current (so the cache is trusted,
        # and a call costs the control plane nothing), not from a fresh whoami.
        status, health = gateway.health()
        assert status == 200, health
        assert health["revocations"]["fresh"] is True
        assert health["revocations"]["epoch"] >= answer.epoch
        for _ in range(3):  # and never served again
            operator.refused("ps", text="revoked")
        user.ok("ps")  # another caller's token is untouched
        with control_plane.client() as client:
            client.token = crew.operator_token
            with pytest.raises(AuthError, match="revoked"):
                client.whoami()

        # A freshly started gateway, with an empty cache, refuses it too.
        restarted = restart_gateway(gateway)
        operator.refused("ps", text="revoked")
        user.ok("ps")

        # Every token of a subject: two logins of one user, revoked with the CLI.
        victim = admin.create_user(f"{crew.user}-2", "user")
        tokens = []
        for _ in range(2):
            with control_plane.client() as client:
                tokens.append(client.login(victim.name, victim.password).access_token)
        both = [DockerCli.make(gateway.host, tmp_path / f"v{i}", t) for i, t in enumerate(tokens)]
        for cli in both:
            cli.ok("ps")
        session = Cli(tmp_path / "admin-session")
        session.login(control_plane, "admin", control_plane.admin_password)
        revoked = session("user", "revoke", victim.name)
        assert revoked.returncode == 0, revoked.stderr
        assert f"user:{victim.name}" in revoked.stdout
        for cli in both:
            assert "revoked" in refused_soon(cli).stderr
        user.ok("ps")
        # Logging in afterwards gives a token that works.
        time.sleep(1.1)  # a token of the same second as the revocation counts as before it
        with control_plane.client() as client:
            third = client.login(victim.name, victim.password).access_token
        DockerCli.make(gateway.host, tmp_path / "third", third).ok("ps")

        entries = [e for e in entries_since(admin, start) if e["kind"] == "identity.revoke"]
        assert [e["revoked"] for e in entries] == [
            f"a token of user:{crew.operator}",
            f"every token of user:{victim.name} issued so far",
        ]
        assert all(e["subject"] == "user:admin" for e in entries)
    finally:
        if restarted is not None:
            restarted.process.stop()
        gateways.close()


def test_who_may_revoke_and_read_revocations(
    control_plane: RunningControlPlane, admin: ControlClient
) -> None:
    crew = make_people(control_plane, "revoke-rights")
    with control_plane.client() as client:
        client.token = crew.user_token
        with pytest.raises(Forbidden, match=r"user\.manage"):
            client.revoke(subject=f"user:{crew.operator}")
        with pytest.raises(Forbidden, match="only nodes and admins"):
            client.revocations()
        with pytest.raises(MalformedError, match="exactly one"):
            client.request("POST", "/v1/auth/revoke", json={})
        # Anyone may revoke a token of their own (logging out).
        own = client.revoke(token=crew.user_token)
        assert own.revoked == f"a token of user:{crew.user}"
        with pytest.raises(AuthError, match="revoked"):
            client.whoami()
    listing = admin.revocations(since=0)
    assert listing.epoch >= 1
    mine = [r for r in listing.revocations if r.subject == f"user:{crew.user}"]
    assert mine
    assert mine[0].token_id
    later = admin.revocations(since=listing.epoch)
    assert later.epoch == listing.epoch
    # Nothing new; recent rows come again (a smaller id may commit late on PostgreSQL).
    assert {r.id for r in later.revocations} <= {r.id for r in listing.revocations}
