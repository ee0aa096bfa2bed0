"""POST /v1/encode: a decoder row (`width` + `latent`) or any vector -> its meta-latents."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from metasae.backend.schemas.common import AtlasSpec, Float32, NonNegInt, Request, Response, either_or

MAX_TERMS = Field(16, ge=1, le=64, strict=True, description="most meta-latents to return")
BOTH = "give either width + latent (a latent of the atlas) or vector (d_model floats), not both"


def encode_body(spec: AtlasSpec) -> Any:
    """The /v1/encode body for one atlas: `EncodeLatent` | `EncodeVector` (its widths and d_model in the schema)."""
    Width = spec.width_type()  # noqa: N806 - a type

    class EncodeLatent(Request):
        """A decoder row of the atlas (the latent must be below its width: checked by the server)."""

        width: Width = Field(examples=[spec.widths[-1] if spec.widths else 2304])  # type: ignore[valid-type]
        latent: NonNegInt = Field(description="latent index in that SAE (0 .. width-1)", examples=[11])
        vector: None = Field(None, description="must be absent or null with width + latent")
        max_terms: int = MAX_TERMS

    n = spec.d_model

    class EncodeVector(Request):
        """Any direction in the residual stream."""

        vector: list[Float32] = Field(min_length=n or 1, max_length=n or 1 << 16,
                                      description=f"a direction in the residual stream ({n or 'd_model'} floats)")
        width: None = Field(None, description="must be absent or null with vector")
        latent: None = Field(None, description="must be absent or null with vector")
        max_terms: int = MAX_TERMS

    def pick(raw: dict) -> str | None:
        by_vector = raw.get("vector") is not None
        by_latent = raw.get("width") is not None or raw.get("latent") is not None
        if by_vector == by_latent:
            return None
        return "EncodeVector" if by_vector else "EncodeLatent"

    return either_or([EncodeLatent, EncodeVector], pick, BOTH, "vector",
                     "either width + latent (a decoder row of the atlas) or vector (any d_model direction)")


EncodeRequest = encode_body(AtlasSpec())  # the body for an atlas not known at start (no enums)


class MetaLatentWeight(Response):
    id: int
    weight: float
    label: str


class EncodeResponse(Response):
    meta_latents: list[MetaLatentWeight] = Field(description="active meta-latents, by weight descending")
    fvu: float = Field(description="||v - meta(v)||^2 / ||v||^2: the share of this vector's squared norm the "
                                   "meta-SAE leaves unexplained")
    d_model: int


__all__ = ["EncodeRequest", "EncodeResponse", "MetaLatentWeight", "encode_body"]
