"""GET /health: answers at once (no auth, no loading), also while the atlas or a model loads."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from metasae.backend.schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, summary="service status (loading | ready) and device")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    body = state.resources.status()
    manifest = state.resources._atlas.manifest if state.resources._atlas is not None else {}
    body.update(model=(manifest.get("model") or {}).get("name"), jobs=state.jobs.counts(),
                auth=bool(state.settings.token), version=state.version)
    return JSONResponse(body, status_code=503 if body["status"] == "error" else 200)
