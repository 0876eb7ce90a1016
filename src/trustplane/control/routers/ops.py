"""Health and metrics: public, and free of anything secret."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from trustplane.api.ops import Health
from trustplane.control.routers.deps import Plane

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
def healthz(plane: Plane) -> Health:
    """Liveness and readiness: the database answers; policy problems and a
    transparency log whose entries contradict its stored tree are reported."""
    with plane.db.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    size, _ = plane.log.head()
    plane.policy.current()  # re-reads a changed file, so a broken one is reported now
    return Health(
        status="ok" if plane.log.damage is None else "degraded",
        log_size=size,
        log_error=plane.log.damage,
        kek=plane.kek.kind,
        policy_error=plane.policy.error,
    )


@router.get("/metrics", response_class=Response)
def metrics() -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
