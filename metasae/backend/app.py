"""The FastAPI application: routes, auth, body-size limit, error answers, lazy loading and idle release.

`create_app(settings)` builds it; `metasae backend` (metasae.backend.server) serves it with uvicorn.
OpenAPI docs: /docs (Swagger UI), /redoc, /openapi.json.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from metasae.backend.config import Settings
from metasae.backend.deps import require_token
from metasae.backend.endpoints import activations, encode, health, jobs, stitch
from metasae.backend.errors import ApiError
from metasae.backend.jobs import JobManager
from metasae.backend.resources import Resources
from metasae.backend.schemas import ErrorResponse

log = logging.getLogger("metasae.backend")

DRAIN_CAP = 64 << 20  # an oversized body is read and dropped up to this much, so the client sees the 413


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("metasae")
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "0+unknown"


class BodyLimit:
    """ASGI middleware: bodies over `max_bytes` (by Content-Length or as streamed) get a 413."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, receive: Any, send: Any, drain: bool) -> None:
        drained = 0
        while drain and drained < DRAIN_CAP:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            drained += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        resp = JSONResponse({"detail": f"body: larger than the limit of {self.max_bytes} bytes "
                                       "(METASAE_MAX_BODY_BYTES)"}, status_code=413)
        await resp({"type": "http"}, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = False  # uvicorn already refuses malformed Content-Length headers
            if too_big:
                return await self._reject(receive, send, drain=True)
            return await self.app(scope, receive, send)  # the server holds the body to its Content-Length
        # No Content-Length (chunked): read the body here, up to the limit, then hand it on.
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, _replay([msg]), send)
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._reject(receive, send, drain=msg.get("more_body", False))
            if not msg.get("more_body", False):
                break
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      receive), send)


def _replay(messages: list[dict], then: Any = None) -> Any:
    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def _field(loc: tuple) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")] if len(loc) > 1 else list(loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
    msgs, errors = [], []
    for e in exc.errors():
        loc = tuple(e.get("loc") or ())
        if e.get("type") == "json_invalid":
            field, msg = "body", f"invalid JSON ({(e.get('ctx') or {}).get('error', 'cannot decode')})"
        else:
            field, msg = _field(loc), str(e.get("msg"))
        msgs.append(f"{field}: {msg}")
        errors.append({"field": field, "msg": msg, "type": e.get("type")})
    return JSONResponse({"detail": "; ".join(msgs), "errors": errors}, status_code=422)


async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)


def _background(app: FastAPI, stop: threading.Event) -> None:
    """Idle release of weights, and exit when the parent process that started us is gone."""
    s: Settings = app.state.settings
    res: Resources = app.state.resources
    period = 1.0 if not s.idle_timeout_s else min(5.0, max(0.2, s.idle_timeout_s / 4))
    while not stop.wait(period):
        try:
            if not app.state.jobs.busy():
                res.release_if_idle()
        except Exception:  # noqa: BLE001 - the reaper must never die
            log.exception("idle release failed")
        if s.parent_pid and not _alive(s.parent_pid):
            log.warning("parent process %d is gone: shutting down", s.parent_pid)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _alive(pid: int) -> bool:
    if os.getppid() != pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _startup(app: FastAPI) -> None:
    res: Resources = app.state.resources
    res.open_atlas()
    if app.state.settings.preload and not res.atlas_error:
        try:
            res.preload()
        except Exception:  # noqa: BLE001 - preloading is an optimisation; requests load again and report
            log.exception("preloading failed")


def create_app(settings: Settings | None = None, resources: Resources | None = None,
               background: bool = True) -> FastAPI:
    """The service for one atlas. `background=False` skips the threads (the caller opens the atlas)."""
    settings = settings or Settings.from_env()
    resources = resources or Resources(settings)
    # Measured (docs/benchmarks.md, 2 shared cores): one torch thread answers /v1/activations 10x faster than
    # two (86 vs 885 ms p50 on SmolLM2) and stitches as fast; so on CPU the default is 1 (METASAE_TORCH_THREADS).
    threads = settings.torch_threads or (1 if resources.device == "cpu" else 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if background:
            threading.Thread(target=_startup, args=(app,), name="metasae-open", daemon=True).start()
            threading.Thread(target=_background, args=(app, stop), name="metasae-reaper", daemon=True).start()
        yield
        stop.set()
        app.state.jobs.shutdown()

    app = FastAPI(
        title="metasae backend",
        version=_version(),
        description="Live meta-SAE encoding, per-token SAE activations and stitching evaluations for one "
                    "metasae atlas. Every /v1 route needs `Authorization: Bearer $METASAE_TOKEN` when the "
                    "service sets METASAE_TOKEN. Errors answer `{\"detail\": \"<field>: <problem>\"}`.",
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse}},
    )
    app.state.settings = settings
    app.state.resources = resources
    app.state.jobs = JobManager(workers=1, max_jobs=settings.max_jobs, ttl_s=settings.job_ttl_s)
    app.state.version = app.version
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.include_router(health.router)
    errors = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 503)}
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=errors)
    for module in (encode, activations, stitch, jobs):
        v1.include_router(module.router)
    app.include_router(v1)
    return app
