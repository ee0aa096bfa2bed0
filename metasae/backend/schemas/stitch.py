"""POST /v1/stitch: start a stitching evaluation of a (small, large) pair on new tokens."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from metasae.backend.schemas.common import AtlasSpec, Request, Response, either_or

ONE = "give exactly one of text or n_tokens"


class _StitchOptions(Request):
    metrics: list[Literal["mse", "ce"]] = Field(["mse", "ce"], min_length=1, max_length=2,
                                                json_schema_extra={"uniqueItems": True})
    threshold: float | None = Field(None, gt=0, le=1, strict=True, allow_inf_nan=False,
                                    description="decoder cosine for reconstruction latents (default: the atlas's)")
    n_shards: int | None = Field(None, ge=1, le=4096, strict=True, description="token shards (Ray tasks)")

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("metrics must not repeat")
        return v


def stitch_body(spec: AtlasSpec) -> Any:
    """The /v1/stitch body for one atlas: `StitchText` | `StitchCorpus` (widths, ctx_len, limits in the schema).
    That `large` must be wider than `small` is checked by the server (JSON Schema cannot compare two fields)."""
    Small = spec.width_type("small", "the smaller SAE width")  # noqa: N806 - types
    Large = spec.width_type("large", "the larger SAE width (wider than small)")  # noqa: N806
    ctx = spec.ctx_len or 1

    class StitchText(_StitchOptions):
        """Evaluate on your text, cut into contexts of the atlas's ctx_len tokens."""

        small: Small  # type: ignore[valid-type]
        large: Large  # type: ignore[valid-type]
        text: str = Field(min_length=1, max_length=spec.max_text_chars, pattern=r"\S",
                          description="text to evaluate on (not only whitespace)")
        n_tokens: None = Field(None, description="must be absent or null with text")

    class StitchCorpus(_StitchOptions):
        """Evaluate on tokens of the atlas's own corpus."""

        small: Small  # type: ignore[valid-type]
        large: Large  # type: ignore[valid-type]
        n_tokens: int = Field(ge=ctx, le=spec.max_stitch_tokens, strict=True,
                              description=f"this many tokens of the atlas's corpus (at least one context, {ctx})")
        seed: int = Field(0, ge=0, strict=True, description="which corpus sample n_tokens draws")
        text: None = Field(None, description="must be absent or null with n_tokens")

    def pick(raw: dict) -> str | None:
        by_text, by_corpus = raw.get("text") is not None, raw.get("n_tokens") is not None
        if by_text == by_corpus:
            return None
        return "StitchText" if by_text else "StitchCorpus"

    return either_or([StitchText, StitchCorpus], pick, ONE, "text",
                     "either text (your tokens) or n_tokens (tokens of the atlas's corpus)")


StitchRequest = stitch_body(AtlasSpec())


class StitchStarted(Response):
    job_id: str
    status: str


__all__ = ["StitchRequest", "StitchStarted", "stitch_body"]
