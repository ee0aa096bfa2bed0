"""POST /v1/activations: text -> per token, the top latents of one SAE."""

from __future__ import annotations

from pydantic import BaseModel, Field

from metasae.backend.schemas.common import NonNegInt, Request


class ActivationsRequest(Request):
    text: str = Field(min_length=1, description="text to run through the model (no BOS is added)")
    width: NonNegInt = Field(description="SAE width of the atlas")
    top_k: int = Field(5, ge=1, le=64, strict=True, description="latents per token")


class TokenLatent(BaseModel):
    latent: int
    activation: float
    label: str


class ActivationsResponse(BaseModel):
    width: int
    tokens: list[str] = Field(description="each token as its own string")
    token_ids: list[int]
    top: list[list[TokenLatent]] = Field(description="per token, its active latents (at most top_k), by activation")
