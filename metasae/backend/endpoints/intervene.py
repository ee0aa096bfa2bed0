"""POST /v1/intervene: edit one latent (ablate, scale its meta-latents, steer) and compare next-token predictions.

`router(spec, settings)` is included by app.create_app next to routes.build_router's routes, with the same auth
and error answers. (No `from __future__ import annotations`: FastAPI must see the per-atlas body type itself.)
"""

from typing import Any

from fastapi import APIRouter, Depends

from metasae.backend.config import Settings
from metasae.backend.deps import ResourcesDep, SettingsDep, computing, require_token
from metasae.backend.endpoints.activations import token_ids
from metasae.backend.errors import field_error
from metasae.backend.resources import Resources
from metasae.backend.schemas.common import AtlasSpec, ErrorResponse
from metasae.backend.schemas.intervene import InterveneResponse, intervene_body


def intervene(req: Any, res: Resources, settings: Settings) -> dict:
    """`req` is the InterveneRequest body of this atlas (schemas.intervene.intervene_body)."""
    from metasae.intervene import Edit, InterventionError, Setup
    from metasae.intervene import intervene as run

    res.check_width(req.width)
    edits = []
    for i, e in enumerate(req.edits):
        scales = {m.meta_latent: m.scale for m in e.meta_scales}
        if len(scales) < len(e.meta_scales):
            raise field_error(f"edits[{i}].meta_scales", "names a meta-latent twice")
        edits.append(Edit(kind=e.kind, meta_scales=scales, steer_latent=e.steer_latent, steer_meta=e.steer_meta,
                          coef=e.coef, name=e.name))
    with computing(res, "intervening"):
        lm, sae, meta = res.lm(), res.sae(req.width), res.meta()
        ids = token_ids(lm.tokenizer, req.prompt)
        if len(ids) > settings.max_tokens:
            raise field_error("prompt", f"gives {len(ids)} tokens, the limit is {settings.max_tokens}", 413)
        setup = Setup(lm=lm, hook=res.hook, sae=sae, meta=meta, meta_labels=res.meta_labels())
        try:
            return run(setup, ids, req.latent, edits, positions=req.positions, fire_latent=req.fire_latent,
                       targets=req.targets, top_k=req.top_k, max_new_tokens=req.max_new_tokens)
        except InterventionError as e:
            raise field_error(e.field, e.message) from None


def router(spec: AtlasSpec, settings: Settings, errors: tuple[int, ...] = (401, 413, 422, 429, 503)) -> APIRouter:
    """The /v1/intervene route for one atlas (its widths in the body's schema; the bearer token when set)."""
    v1 = APIRouter(prefix="/v1", responses={c: {"model": ErrorResponse} for c in errors if settings.token or c != 401},
                   dependencies=[Depends(require_token)] if settings.token else [])
    Body = intervene_body(spec)  # noqa: N806 - a type

    @v1.post("/intervene", response_model=InterveneResponse, tags=["intervention"],
             summary="ablate a latent, scale its meta-latents or steer; clean vs edited next-token predictions")
    def post_intervene(req: Body, res: ResourcesDep, settings: SettingsDep) -> dict:  # type: ignore[valid-type]
        return intervene(req, res, settings)

    return v1
