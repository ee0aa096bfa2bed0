"""GET /health."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Loaded(BaseModel):
    model: bool
    meta_sae: bool
    saes: list[int]


class HealthResponse(BaseModel):
    status: Literal["loading", "ready", "error"] = Field(
        description="loading while the atlas opens or a model/SAE loads; error when the atlas cannot be opened")
    device: str = Field(description="torch device the service computes on: cpu, cuda, cuda:N")
    device_name: str
    atlas: str
    atlas_error: str | None = None
    model: str | None = Field(None, description="the atlas's language model")
    loading: list[str] = Field(description="what is loading right now (atlas, model, meta_sae, sae:<width>)")
    loaded: Loaded
    jobs: dict[str, int]
    idle_timeout_s: float
    released: int = Field(description="how many times idle weights were released")
    auth: bool = Field(description="whether /v1 routes need a bearer token")
    version: str
