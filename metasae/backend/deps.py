"""FastAPI dependencies: the shared resources, the job manager, the bearer-token check."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from metasae.backend.config import Settings
from metasae.backend.errors import ApiError, free_cuda_cache, is_oom, oom_message
from metasae.backend.jobs import JobManager
from metasae.backend.resources import Resources

bearer = HTTPBearer(auto_error=False, description="the value of METASAE_TOKEN, when the service sets one")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_resources(request: Request) -> Resources:
    return request.app.state.resources


async def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs


def _token_ok(request: Request, cred: HTTPAuthorizationCredentials | None) -> bool:
    token = request.app.state.settings.token
    return cred is not None and hmac.compare_digest(cred.credentials.encode(), token.encode())


async def require_token(request: Request,
                        cred: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> None:
    """`Authorization: Bearer <token>` (constant-time compare); only routed when METASAE_TOKEN is set."""
    if cred is None:
        raise ApiError(401, "Authorization: missing bearer token (this backend sets METASAE_TOKEN; send "
                            "'Authorization: Bearer <token>')")
    if not _token_ok(request, cred):
        raise ApiError(401, "Authorization: wrong bearer token")


async def optional_token(request: Request,
                         cred: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> bool:
    """Whether the request carries the right token (routes that answer less without it, like /health)."""
    return _token_ok(request, cred)


ResourcesDep = Annotated[Resources, Depends(get_resources)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@contextmanager
def computing(res: Resources, what: str) -> Iterator[Resources]:
    """Hold the weights for one request; out-of-memory becomes a 503 and the cache is freed."""
    with res.use():
        try:
            yield res
        except ApiError:
            raise
        except Exception as e:
            if is_oom(e):
                free_cuda_cache()
                raise ApiError(503, oom_message(what, e)) from e
            raise
