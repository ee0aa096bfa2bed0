"""POST /v1/stitch: start a stitching evaluation of a (small, large) pair on new tokens."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from metasae.backend.schemas.common import NonNegInt, PosInt, Request


class StitchRequest(Request):
    """Exactly one of `text` (your tokens) or `n_tokens` (that many tokens of the atlas's own corpus)."""

    small: NonNegInt = Field(description="the smaller SAE width", examples=[1152])
    large: NonNegInt = Field(description="the larger SAE width", examples=[2304])
    text: str | None = Field(None, description="text to evaluate on (cut into contexts of the atlas's ctx_len)")
    n_tokens: PosInt | None = Field(None, description="evaluate on this many tokens of the atlas's corpus")
    metrics: list[Literal["mse", "ce"]] = Field(["mse", "ce"], min_length=1, max_length=2)
    threshold: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                    description="decoder cosine for reconstruction latents (default: the atlas's)")
    seed: int = Field(0, ge=0, strict=True, description="which corpus sample `n_tokens` draws")
    n_shards: int | None = Field(None, ge=1, le=4096, strict=True, description="token shards (Ray tasks)")

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("metrics must not repeat")
        return v


class StitchStarted(BaseModel):
    job_id: str
    status: str
