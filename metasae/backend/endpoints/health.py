"""GET /health: answers at once (no loading), also while the atlas or a model loads."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse


def health(request: Request, full: bool) -> JSONResponse:
    """The service's status; `full=False` (a token is set and was not sent): status, auth and version only."""
    state = request.app.state
    body = state.resources.status()
    status = 503 if body["status"] == "error" else 200
    if not full:
        return JSONResponse({"status": body["status"], "auth": True, "version": state.version}, status_code=status)
    atlas = state.resources._atlas
    body.update(model=atlas.manifest.model.name if atlas is not None else None, jobs=state.jobs.counts(),
                auth=bool(state.settings.token), version=state.version)
    return JSONResponse(body, status_code=status)
