"""The route table, built for one atlas and one set of settings, so that the OpenAPI contract says exactly what
this server accepts: the atlas's widths as enums, its d_model as the vector length, the service's limits, and
a bearer security scheme only when METASAE_TOKEN is set. The handlers live in `endpoints/`.

(No `from __future__ import annotations` here: FastAPI must see the per-atlas body types themselves.)
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.routing import APIRoute

from metasae.backend.config import Settings
from metasae.backend.deps import JobsDep, ResourcesDep, SettingsDep, optional_token, require_token
from metasae.backend.endpoints import activations, encode, health, jobs, stitch
from metasae.backend.schemas import (
    ActivationsResponse,
    AtlasSpec,
    EncodeResponse,
    ErrorResponse,
    HealthResponse,
    JobResponse,
    StitchStarted,
    activations_body,
    encode_body,
    stitch_body,
)

JOB_ID = r"^[0-9a-f]{32}$"
JobId = Annotated[str, Path(pattern=JOB_ID, description="the id POST /v1/stitch answered (32 hex digits)")]
ERRORS = (401, 404, 413, 422, 429, 503)


def build_router(spec: AtlasSpec, settings: Settings) -> tuple[APIRouter, list[APIRoute]]:
    """/health and every /v1 route, with request bodies for `spec` and auth as `settings` say; also the routes
    as a flat list (middleware.AllowedMethods matches paths against it)."""
    root = APIRouter()
    root.add_api_route("/health", health_route(settings), methods=["GET"], response_model=HealthResponse,
                       response_model_exclude_none=True, tags=["health"],
                       summary="service status (loading | ready) and device",
                       responses={503: {"model": HealthResponse, "description": "the atlas cannot be opened"}},
                       # with a token the bearer is optional here (it only widens the answer): `{}` = no auth
                       openapi_extra={"security": [{}]} if settings.token else None)
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in ERRORS
                                               if settings.token or code != 401}
    v1 = APIRouter(prefix="/v1", responses=errors,
                   dependencies=[Depends(require_token)] if settings.token else [])
    # BODY: classes built at start for this atlas; FastAPI reads them from the annotations at runtime, a static
    # checker cannot (hence the valid-type ignores below)
    EncodeBody, ActivationsBody, StitchBody = encode_body(spec), activations_body(spec), stitch_body(spec)  # noqa: N806

    @v1.post("/encode", response_model=EncodeResponse, tags=["meta-SAE"],
             summary="decompose a latent or vector into meta-latents")
    async def post_encode(req: EncodeBody, res: ResourcesDep) -> dict:  # type: ignore[valid-type]  # see BODY
        return await encode.encode(req, res)

    @v1.post("/activations", response_model=ActivationsResponse, tags=["live"],
             summary="per-token top latents of new text")
    def post_activations(req: ActivationsBody, res: ResourcesDep,  # type: ignore[valid-type]  # see BODY
                         settings: SettingsDep) -> dict:
        return activations.activations(req, res, settings)

    @v1.post("/stitch", response_model=StitchStarted, status_code=202, tags=["stitching"],
             summary="start a stitching evaluation job (poll GET /v1/jobs/{job_id})")
    def post_stitch(req: StitchBody, res: ResourcesDep,  # type: ignore[valid-type]  # see BODY
                    jobs_: JobsDep, settings: SettingsDep) -> dict:
        return stitch.start_stitch(req, res, jobs_, settings)

    @v1.get("/jobs", response_model=list[JobResponse], tags=["stitching"],
            summary="all jobs still kept (results left out)")
    def list_jobs(jobs_: JobsDep) -> list[dict]:
        return jobs.list_jobs(jobs_)

    @v1.get("/jobs/{job_id}", response_model=JobResponse, tags=["stitching"],
            summary="a job's status, progress and result")
    def get_job(job_id: JobId, jobs_: JobsDep) -> dict:
        return jobs.get_job(job_id, jobs_)

    @v1.delete("/jobs/{job_id}", response_model=JobResponse, tags=["stitching"], summary="cancel a job")
    def cancel_job(job_id: JobId, jobs_: JobsDep) -> dict:
        return jobs.cancel_job(job_id, jobs_)

    flat = [r for r in [*root.routes, *v1.routes] if isinstance(r, APIRoute)]
    root.include_router(v1)
    return root, flat


def health_route(settings: Settings):
    """GET /health; with a token, the bearer is optional and only a request that sends it gets the full report."""
    if not settings.token:
        async def get_health(request: Request):
            return health.health(request, full=True)
        return get_health

    async def get_health_authed(request: Request, authed: Annotated[bool, Depends(optional_token)]):
        return health.health(request, full=authed)
    return get_health_authed

