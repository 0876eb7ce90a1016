"""The plugin's HTTP side: Docker's volume plugin protocol mapped onto the driver.

Every call is a POST whose JSON body dockerd sends with the plugin media
type (sometimes empty: Activate, List, Capabilities). A failure is an
answer with `Err` set to one line, which dockerd shows the user as it is
(`docker run` prints `... VolumeDriver.Mount: <line>`); an unexpected error
says only that it is internal (details in the plugin's log, never a key).
The driver's calls block (tools, the control plane), so they run in the
thread pool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from trustplane.errors import TrustplaneError
from trustplane.volumes.attachers.docker_plugin.driver import VolumeDriver
from trustplane.volumes.attachers.docker_plugin.protocol import (
    CONTENT_TYPE,
    Activated,
    Answer,
    CapabilitiesAnswer,
    CreateRequest,
    GetAnswer,
    ListAnswer,
    MountAnswer,
    MountRequest,
    NameRequest,
)

log = logging.getLogger("trustplane.volumes.plugin")
MAX_BODY = 64 * 1024
R = TypeVar("R", bound=BaseModel)
A = TypeVar("A", bound=Answer)


class _BadRequest(Exception):
    pass


def _answer(model: BaseModel) -> JSONResponse:
    return JSONResponse(model.model_dump(by_alias=True), media_type=CONTENT_TYPE)


async def _body(request: Request, kind: type[R]) -> R:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise _BadRequest("the request body is too large")
    try:
        document = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise _BadRequest("the request body is not JSON") from None
    try:
        return kind.model_validate(document if document is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise _BadRequest(f"bad request: {where}: {first.get('msg')}") from None


async def _call(
    answer: type[A], work: Callable[[], Any], fields: Callable[[Any], dict[str, Any]]
) -> A:
    """Run `work` in the thread pool; its result (through `fields`) or its error as `Err`."""
    try:
        result = await run_in_threadpool(work)
    except TrustplaneError as exc:
        return answer(err=str(exc))
    except Exception:
        log.exception("volume plugin: internal error")
        return answer(err="trustplane volume plugin: internal error (see the plugin's log)")
    return answer(**fields(result))


def create_app(driver: VolumeDriver) -> FastAPI:
    """The ASGI application dockerd talks to."""
    app = FastAPI(title="trustplane volume plugin", docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip

    @app.exception_handler(_BadRequest)
    async def bad_request(request: Request, exc: _BadRequest) -> JSONResponse:
        return _answer(Answer(err=str(exc)))

    @app.post("/Plugin.Activate")
    async def activate() -> JSONResponse:
        return _answer(Activated())

    @app.post("/VolumeDriver.Capabilities")
    async def capabilities() -> JSONResponse:
        return _answer(CapabilitiesAnswer())

    @app.post("/VolumeDriver.Create")
    async def create(request: Request) -> JSONResponse:
        body = await _body(request, CreateRequest)
        done = await _call(Answer, lambda: driver.create(body.name, body.opts), lambda _: {})
        return _answer(done)

    @app.post("/VolumeDriver.Remove")
    async def remove(request: Request) -> JSONResponse:
        body = await _body(request, NameRequest)
        return _answer(await _call(Answer, lambda: driver.remove(body.name), lambda _: {}))

    @app.post("/VolumeDriver.Mount")
    async def mount(request: Request) -> JSONResponse:
        body = await _body(request, MountRequest)
        done = await _call(
            MountAnswer, lambda: driver.mount(body.name, body.id), lambda p: {"mountpoint": p}
        )
        return _answer(done)

    @app.post("/VolumeDriver.Unmount")
    async def unmount(request: Request) -> JSONResponse:
        body = await _body(request, MountRequest)
        return _answer(
            await _call(Answer, lambda: driver.unmount(body.name, body.id), lambda _: {})
        )

    @app.post("/VolumeDriver.Path")
    async def path(request: Request) -> JSONResponse:
        body = await _body(request, NameRequest)
        done = await _call(MountAnswer, lambda: driver.path(body.name), lambda p: {"mountpoint": p})
        return _answer(done)

    @app.post("/VolumeDriver.Get")
    async def get(request: Request) -> JSONResponse:
        body = await _body(request, NameRequest)
        return _answer(
            await _call(GetAnswer, lambda: driver.get(body.name), lambda v: {"volume": v})
        )

    @app.post("/VolumeDriver.List")
    async def list_volumes() -> JSONResponse:
        return _answer(await _call(ListAnswer, driver.list_volumes, lambda v: {"volumes": v}))

    return app
