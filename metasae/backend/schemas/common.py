"""Types shared by several routes, and `AtlasSpec`: what the request schemas know of the served atlas."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from fastapi import Body
from pydantic import BaseModel, Discriminator, Field, Tag

# JSON numbers only: "64" or 64.0 or true are refused, not coerced.
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
# A vector component: a JSON number (no "1_000", no true) within +-1e9. The meta-SAE computes in float32, whose
# squares overflow past ~1.8e19 (the fuzz found a component of 2.2e19 giving an infinite FVU); residual streams
# stay far below (SmolLM2's attention sink, the largest seen here, is ~2.4e4).
VECTOR_LIMIT = 1e9
Float32 = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-VECTOR_LIMIT, le=VECTOR_LIMIT)]

# Tags of the either/or bodies: pydantic puts them into error locations, the error handler takes them out again
UNION_TAGS: set[str] = set()


class Request(BaseModel):
    """A request body: unknown fields are refused (a typo must not silently fall back to a default)."""

    model_config = {"extra": "forbid"}


class Response(BaseModel):
    """A response body. Also readable like the dict it was before the client returned models
    (`r["meta_latents"]`, `r.get("status")`), so callers written against dicts keep working."""

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None) if key in type(self).model_fields else None
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in type(self).model_fields

    def keys(self) -> Iterator[str]:
        return iter(type(self).model_fields)


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: `detail` starts with the name of the field at fault (`width: ...`)."""

    detail: str = Field(examples=["width: Input should be 64, 128 or 256"])


@dataclass(frozen=True)
class AtlasSpec:
    """What the served atlas's manifest says at start; request schemas are built from it (None: not known)."""

    widths: tuple[int, ...] | None = None
    d_model: int | None = None
    ctx_len: int | None = None
    max_text_chars: int = 20_000
    max_stitch_tokens: int = 262_144

    def width_type(self, which: Literal["any", "small", "large"] = "any", description: str = "") -> Any:
        """A width of this atlas as an enum (`small` leaves out the widest, `large` the narrowest)."""
        field = Field(description=description or "SAE width of the atlas")
        if not self.widths:
            return Annotated[int, Field(strict=True, ge=0), field]
        ws = {"any": self.widths, "small": self.widths[:-1] or self.widths,
              "large": self.widths[1:] or self.widths}[which]
        return Annotated[Literal[tuple(ws)], field]  # Literal: JSON integers only ("64" and true are refused)


def either_or(variants: Sequence[type[BaseModel]], pick: Callable[[dict], str | None], message: str,
              field: str, description: str) -> Any:
    """A body that is exactly one of `variants` (a `oneOf` in OpenAPI). `pick(raw)` names the variant the raw
    body is meant as (it is then validated as that alone), or None: refused with `message`, naming `field`."""
    names = [v.__name__ for v in variants]
    UNION_TAGS.update(names)

    def tag(raw: Any) -> str | None:
        if isinstance(raw, BaseModel):
            return type(raw).__name__
        return pick(raw) if isinstance(raw, dict) else names[0]

    members = tuple(Annotated[v, Tag(n)] for v, n in zip(variants, names, strict=True))
    return Annotated[Union[members], Discriminator(  # noqa: UP007 - a Union built from a tuple
        tag, custom_error_type="either_or", custom_error_message=message, custom_error_context={"field": field}),
        Body(description=description)]
