"""Types shared by several routes."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

# JSON numbers only: "64" or 64.0 or true are refused, not coerced.
StrictInt = Annotated[int, Field(strict=True)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
PosInt = Annotated[int, Field(strict=True, gt=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Request(BaseModel):
    """A request body: unknown fields are refused (a typo must not silently fall back to a default)."""

    model_config = {"extra": "forbid"}


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: `detail` starts with the name of the field at fault (`width: ...`)."""

    detail: str = Field(examples=["width: 100 is not a width of this atlas (widths: [64, 128, 256])"])
