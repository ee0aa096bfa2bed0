"""GET /health."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metasae.backend.schemas.common import Response


class Loaded(Response):
    model: bool
    meta_sae: bool
    saes: list[int]


class HealthResponse(Response):
    """The full report; with METASAE_TOKEN set, a request without the token gets only status, auth and version
    (nothing about the host: no paths, no device, no model)."""

    status: Literal["loading", "ready", "error"] = Field(
        description="loading while the atlas opens or a model/SAE loads; error when the atlas cannot be opened")
    auth: bool = Field(description="whether /v1 routes need a bearer token")
    version: str
    device: str | None = Field(None, description="torch device the service computes on: cpu, cuda, cuda:N")
    device_name: str | None = None
    atlas: str | None = None
    atlas_error: str | None = None
    model: str | None = Field(None, description="the atlas's language model")
    loading: list[str] | None = Field(None, description="what is loading now (atlas, model, meta_sae, sae:<width>)")
    loaded: Loaded | None = None
    jobs: dict[str, int] | None = None
    idle_timeout_s: float | None = None
    released: int | None = Field(None, description="how many times idle weights were released")
