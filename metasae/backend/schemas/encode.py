"""POST /v1/encode: a decoder row or any vector -> its meta-latents."""

from __future__ import annotations

from pydantic import BaseModel, Field

from metasae.backend.schemas.common import FiniteFloat, NonNegInt, Request


class EncodeRequest(Request):
    """Either `width` + `latent` (a decoder row of the atlas) or `vector` (d_model finite floats)."""

    width: NonNegInt | None = Field(None, description="SAE width of the atlas", examples=[2304])
    latent: NonNegInt | None = Field(None, description="latent index in that SAE", examples=[11])
    vector: list[FiniteFloat] | None = Field(None, max_length=1 << 16,
                                             description="a direction in the residual stream (d_model floats)")
    max_terms: int = Field(16, ge=1, le=64, strict=True, description="most meta-latents to return")


class MetaLatentWeight(BaseModel):
    id: int
    weight: float
    label: str


class EncodeResponse(BaseModel):
    meta_latents: list[MetaLatentWeight] = Field(description="active meta-latents, by weight descending")
    fvu: float = Field(description="||v - meta(v)||^2 / ||v||^2: the share of this vector's squared norm the "
                                   "meta-SAE leaves unexplained")
    d_model: int
