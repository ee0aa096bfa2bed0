"""POST /v1/intervene: a prompt and up to four edits of one latent -> clean vs edited next-token distributions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, create_model

from metasae.backend.schemas.common import AtlasSpec, NonNegInt, Request, Response

MAX_EDITS, MAX_TARGETS, MAX_NEW_TOKENS = 4, 8, 32
Positions = Literal["all", "fires"]  # an alias: inline in create_model's tuple mypy reads the strings as annotations
SCALE = Field(strict=True, allow_inf_nan=False, ge=-10, le=10,
              description="factor on the meta-latent's weight in the latent's decomposition (0 removes it, 1 keeps it)")


class MetaScale(Request):
    meta_latent: NonNegInt = Field(description="a meta-latent of the latent's decomposition")
    scale: float = SCALE


class InterveneEdit(Request):
    """One edit of latent `latent`'s contribution to the residual stream (see metasae.intervene)."""

    kind: Literal["ablate", "meta", "steer"] = Field(
        description="ablate: subtract a_L d_L; meta: scale meta-latents inside a_L d_L; steer: add coef x a unit "
                    "direction")
    meta_scales: list[MetaScale] = Field([], max_length=16, description="meta: the meta-latents to scale")
    steer_latent: NonNegInt | None = Field(None, description="steer: a latent of the same width (default: latent)")
    steer_meta: NonNegInt | None = Field(None, description="steer: a meta-latent's direction instead")
    coef: float = Field(0.0, strict=True, allow_inf_nan=False, ge=-1e4, le=1e4,
                        description="steer: coefficient on the unit direction (residual-norm units)")
    name: str = Field("", max_length=80, description="a name to show for this edit")


def intervene_body(spec: AtlasSpec) -> Any:
    """The /v1/intervene body for one atlas (its widths as an enum, the service's text limit)."""
    return create_model(
        "InterveneRequest", __base__=Request,
        prompt=(str, Field(min_length=1, max_length=spec.max_text_chars,
                           description="text whose next token is predicted (no BOS is added); the server also "
                                       "refuses a prompt of more tokens than METASAE_MAX_TOKENS (413)")),
        width=(spec.width_type(), ...),
        latent=(NonNegInt, Field(description="the latent L that edits act on (0 .. width-1)")),
        edits=(list[InterveneEdit], Field(min_length=1, max_length=MAX_EDITS)),
        positions=(Positions, Field("all", description="edit every token (but the first), or the "
                                                                    "tokens where fire_latent fires")),
        fire_latent=(NonNegInt | None, Field(None, description="positions=fires: this latent (default: latent)")),
        targets=(list[Annotated[str, Field(min_length=1, max_length=100)]], Field([], max_length=MAX_TARGETS,
                                  description="tokens to watch, e.g. ' Germany' (each one's first token)")),
        top_k=(int, Field(10, ge=1, le=50, strict=True, description="most likely next tokens to list")),
        max_new_tokens=(int, Field(0, ge=0, le=MAX_NEW_TOKENS, strict=True,
                                   description="greedy continuation length, clean and edited (0: none)")),
    )


InterveneRequest = intervene_body(AtlasSpec())


class TokenProb(Response):
    token: str
    id: int
    prob: float


class TargetClean(Response):
    text: str
    id: int = Field(description="the first token of the target text")
    n_tokens: int = Field(description="tokens of the target text (only the first is scored)")
    logp_clean: float


class TargetChange(TargetClean):
    token: str
    logp_edited: float
    delta: float = Field(description="logp_edited - logp_clean (nats)")


class MetaScaleUsed(Response):
    meta_latent: int
    weight: float
    scale: float
    label: str


class EditResult(Response):
    name: str
    kind: str
    positions: list[int] = Field(description="token positions the edit touched")
    n_positions: int
    edit_norm: float = Field(description="largest norm of the change to one token's residual")
    top: list[TokenProb]
    kl: float = Field(description="KL(clean || edited) of the next-token distribution, nats")
    targets: list[TargetChange]
    continuation: str | None
    decomposition: list[MetaScaleUsed] | None = Field(description="meta: the latent's meta-latents and scales")


class CleanResult(Response):
    top: list[TokenProb]
    continuation: str | None


class InterveneResponse(Response):
    tokens: list[str]
    token_ids: list[int]
    latent: int
    width: int
    clean: CleanResult
    edits: list[EditResult]
    targets: list[TargetClean]


__all__ = ["EditResult", "InterveneEdit", "InterveneRequest", "InterveneResponse", "MetaScale", "intervene_body"]
