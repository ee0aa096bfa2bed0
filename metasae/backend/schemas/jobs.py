"""GET / DELETE /v1/jobs/{id}."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from metasae.backend.schemas.common import Response


class JobResponse(Response):
    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float = Field(ge=0, le=1)
    message: str
    result: dict[str, Any] | None = Field(
        None, description="when done: n_tokens, per large latent kind / group_id / delta_mse / group_delta_mse "
                          "(/ delta_ce_attr), and the interpolation curve [{step, action, l0, mse, ce_loss}]")
    request: dict[str, Any]
    created: float
    started: float | None = None
    finished: float | None = None
