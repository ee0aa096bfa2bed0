"""POST /v1/activations: text -> per token, the top latents of one SAE."""

from __future__ import annotations

from typing import Any

from pydantic import Field, create_model

from metasae.backend.schemas.common import AtlasSpec, Request, Response


def activations_body(spec: AtlasSpec) -> Any:
    """The /v1/activations body for one atlas (its widths as an enum, the service's text limit)."""
    model = create_model(
        "ActivationsRequest", __base__=Request,
        text=(str, Field(min_length=1, max_length=spec.max_text_chars,
                         description="text to run through the model (no BOS is added); the server also refuses "
                                     "text of more tokens than METASAE_MAX_TOKENS (413)")),
        width=(spec.width_type(), ...),
        top_k=(int, Field(5, ge=1, le=64, strict=True, description="latents per token")),
    )
    return model


ActivationsRequest = activations_body(AtlasSpec())


class TokenLatent(Response):
    latent: int
    activation: float
    label: str


class ActivationsResponse(Response):
    width: int
    tokens: list[str] = Field(description="each token as its own string")
    token_ids: list[int]
    top: list[list[TokenLatent]] = Field(description="per token, its active latents (at most top_k), by activation")
