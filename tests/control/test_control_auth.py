"""`POST /v1/auth/token` for users: a role users cannot have never logs in, even under -O."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from trustplane.control.app import create_app
from trustplane.control.identity import hash_password
from trustplane.control.models import User
from trustplane.control.service import ControlPlane
from trustplane.embedded.app_server import serve_app

PASSWORD = "a long enough password"


def add_user(plane: ControlPlane, name: str, role: str) -> None:
    """A row as only a tampered or hand-edited database could hold it (the API checks roles)."""
    with plane.db.session() as session:
        session.add(
            User(id=str(uuid.uuid4()), name=name, role=role, password_hash=hash_password(PASSWORD))
        )


def login(plane: ControlPlane, name: str) -> tuple[int, dict[str, object]]:
    with serve_app(create_app(plane)) as url:  # no lifespan: the plane is the test's
        answer = httpx.post(
            f"{url}/v1/auth/token",
            json={"grant_type": "password", "username": name, "password": PASSWORD},
        )
    return answer.status_code, answer.json()


def test_a_user_row_with_a_node_or_unknown_role_is_refused(plane: ControlPlane) -> None:
    add_user(plane, "operator-olga", "operator")
    add_user(plane, "not-a-node", "node")
    add_user(plane, "root", "superuser")
    status, body = login(plane, "operator-olga")
    assert status == 200, body
    for name in ("not-a-node", "root"):
        assert login(plane, name) == (
            401,
            {"error": {"type": "AuthError", "message": "wrong user name or password"}},
        )


def test_the_role_check_holds_under_python_minus_o(tmp_path: Path) -> None:
    """Asserts are stripped by -O: the check must not be one."""
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
assert False, "this line is skipped under -O"
from test_control_auth import add_user, login
from trustplane.control.service import build
from trustplane.control.settings import ServerSettings
plane = build(ServerSettings(data_dir=Path({str(tmp_path / "data")!r})), announce=False)
add_user(plane, "not-a-node", "node")
print(login(plane, "not-a-node")[0])
plane.close()
"""
    run = subprocess.run(
        [sys.executable, "-O", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "401"
