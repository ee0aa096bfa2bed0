"""The FastAPI application: routes, auth, body-size limit, Host check, error answers, lazy loading, idle release.

`create_app(settings)` builds it; `metasae backend` (metasae.backend.server) serves it with uvicorn.
OpenAPI docs: /docs (Swagger UI), /redoc, /openapi.json (behind the token when one is set, unless
METASAE_PUBLIC_DOCS=1). The contract is built from the atlas's manifest at start (routes.py), so it carries the
atlas's widths, d_model and the service's limits; `scripts/openapi.py` writes it to docs/openapi.json.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

from metasae.backend.config import Settings
from metasae.backend.endpoints import intervene
from metasae.backend.errors import ApiError
from metasae.backend.jobs import JobManager
from metasae.backend.middleware import AllowedMethods, BodyLimit, DocsGuard, HostCheck
from metasae.backend.resources import Resources
from metasae.backend.routes import build_router
from metasae.backend.schemas import UNION_TAGS, AtlasSpec, ErrorResponse

log = logging.getLogger("metasae.backend")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("metasae")
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "0+unknown"


def _field(loc: tuple) -> str:
    # "body" and the either/or bodies' variant names (EncodeLatent, ...) say where, not what: leave them out
    parts = [p for p in loc if p not in ("body", "query", "path", "header") and p not in UNION_TAGS]
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
        elif e.get("type") == "either_or":  # schemas.common.either_or names the field in the error's context
            field, msg = (e.get("ctx") or {}).get("field", "body"), str(e.get("msg"))
        else:
            field, msg = _field(loc), str(e.get("msg"))
        msgs.append(f"{field}: {msg}")
        errors.append({"field": field, "msg": msg, "type": e.get("type")})
    return JSONResponse({"detail": "; ".join(msgs), "errors": errors}, status_code=422)


async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)


async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Starlette's own refusals (an unknown path) in the service's shape
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse({"detail": f"path: {detail}" if exc.status_code == 404 else detail},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
    # A bug or an unforeseen failure: logged with its traceback, answered as JSON that says what (never bare text)
    log.error("%s %s failed", req.method, req.url.path, exc_info=exc)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {str(exc)[:300]} (see the backend log)"},
                        status_code=500)


def atlas_spec(settings: Settings) -> AtlasSpec:
    """Widths, d_model and ctx_len from the atlas's manifest (cheap: read at start; the full open runs later)."""
    from metasae.atlas import read_manifest
    from metasae.backend.endpoints.stitch import ctx_len_of

    limits = AtlasSpec(max_text_chars=settings.max_text_chars, max_stitch_tokens=settings.max_stitch_tokens)
    m, _ = read_manifest(settings.atlas)
    if m is None:
        return limits
    saes = found if isinstance(found := m.get("saes"), list) else []
    widths = sorted({s["width"] for s in saes if isinstance(s, dict) and type(s.get("width")) is int})
    model = found if isinstance(found := m.get("model"), dict) else {}
    d_model = model.get("d_model")
    return replace(limits, widths=tuple(widths) or None,
                   d_model=d_model if type(d_model) is int and d_model > 0 else None, ctx_len=ctx_len_of(m))


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
                    "metasae atlas. " + ("Every /v1 route needs `Authorization: Bearer $METASAE_TOKEN`. "
                                         if settings.token else "This server runs without a token. ")
                    + 'Errors answer `{"detail": "<field>: <problem>"}`.',
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse}},
    )
    app.state.settings = settings
    app.state.resources = resources
    app.state.jobs = JobManager(workers=1, max_jobs=settings.max_jobs, ttl_s=settings.job_ttl_s)
    app.state.version = app.version
    app.state.spec = atlas_spec(settings)
    # the decorator form: add_exception_handler's type wants handlers of any Exception, these take their own class
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(Exception)(_unexpected)
    router, routes = build_router(app.state.spec, settings)
    app.include_router(router)
    extra = intervene.router(app.state.spec, settings)  # POST /v1/intervene (issue 12)
    app.include_router(extra)
    # include_router does not list the intervene routes in app.router.routes
    all_routes: list[BaseRoute] = [*routes, *extra.routes]
    # Added innermost first: a request meets the Host check, then the body limit, the docs guard, OPTIONS / 405.
    app.add_middleware(AllowedMethods,
                       routes=[r for r in app.router.routes if getattr(r, "methods", None)] + all_routes)
    if settings.token and not settings.public_docs:
        app.add_middleware(DocsGuard, token=settings.token)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # Without a token, DNS rebinding could reach a loopback backend from a web page; with one it gets nothing.
    allowed = settings.allowed_hosts if settings.allowed_hosts is not None else (("*",) if settings.token else ())
    app.add_middleware(HostCheck, bound=settings.host, allowed=allowed)
    return app


def openapi_contract(atlas: str = "data", token: bool = True) -> dict:
    """The OpenAPI document a backend for `atlas` publishes (with a token set, or without); what
    scripts/openapi.py writes to docs/openapi.json. Reads only the atlas's manifest, loads nothing."""
    settings = Settings.from_values(atlas=str(atlas), token="x" if token else None)  # not the shell's METASAE_*
    return create_app(settings, Resources(settings, device="cpu"), background=False).openapi()
