"""What handlers share: the control plane, and who is calling."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from trustplane.control.identity import Principal
from trustplane.control.service import ControlPlane
from trustplane.errors import AuthError

_bearer = HTTPBearer(auto_error=False, description="An access token from /v1/auth/token")


# Both are `async def` on purpose: FastAPI runs a plain `def` dependency in
# the thread pool, a hop that costs more than what they do (a dict lookup; a
# token verification is cached after the first).


async def plane(request: Request) -> ControlPlane:
    value: ControlPlane = request.app.state.plane
    return value


async def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthError("this endpoint needs a bearer token (trustplane login)")
    control: ControlPlane = request.app.state.plane
    verified = control.tokens.verify(credentials.credentials)
    control.revocations.check(verified)
    return verified


Plane = Annotated[ControlPlane, Depends(plane)]
Caller = Annotated[Principal, Depends(principal)]
