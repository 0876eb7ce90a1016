"""What handlers share: the control plane, and who is calling."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from trustplane.control.identity import Principal
from trustplane.control.service import ControlPlane
from trustplane.errors import AuthError

_bearer = HTTPBearer(auto_error=False, description="An access token from /v1/auth/token")


def plane(request: Request) -> ControlPlane:
    value: ControlPlane = request.app.state.plane
    return value


def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthError("this endpoint needs a bearer token (trustplane login)")
    return plane(request).tokens.verify(credentials.credentials)


Plane = Annotated[ControlPlane, Depends(plane)]
Caller = Annotated[Principal, Depends(principal)]
