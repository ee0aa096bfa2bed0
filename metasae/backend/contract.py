"""What the dashboard may ask of a backend: one interface, served in-process or over HTTP.

Every method returns the response model of its route (metasae.backend.schemas), which also reads like the
JSON dict the route answers (`r["meta_latents"]`, `r.get("status")`):
- encode        -> EncodeResponse {"meta_latents": [{"id", "weight", "label"}, ...], "fvu", "d_model"}
- activations   -> ActivationsResponse {"tokens": [str], "token_ids", "top": [[{"latent", "activation", "label"}]]}
- start_stitch  -> StitchStarted {"job_id", "status"}
- job, cancel   -> JobResponse {"id", "status": queued|running|done|failed|cancelled, "progress" (0..1), "message",
                   "result": dict | None, ...}
- health        -> HealthResponse {"status": loading|ready|error, "device", "model", ...}
Errors raise BackendError with the service's message (and HTTP status where there is one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from metasae.backend.schemas import (
        ActivationsResponse,
        EncodeResponse,
        HealthResponse,
        JobResponse,
        StitchStarted,
    )


class BackendError(RuntimeError):
    """A request the backend refused or could not serve; `status` is the HTTP status when there is one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Backend(Protocol):
    def health(self) -> HealthResponse: ...

    def encode(self, *, width: int | None = None, latent: int | None = None,
               vector: list[float] | None = None) -> EncodeResponse: ...

    def activations(self, text: str, width: int, top_k: int = 5) -> ActivationsResponse: ...

    def start_stitch(self, small: int, large: int, *, text: str | None = None, n_tokens: int | None = None,
                     metrics: tuple[str, ...] = ("mse", "ce")) -> StitchStarted: ...

    def job(self, job_id: str) -> JobResponse: ...

    def cancel(self, job_id: str) -> JobResponse: ...
