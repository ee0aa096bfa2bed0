"""What the dashboard may ask of a backend: one interface, served in-process or over HTTP.

Every method returns plain JSON-able dicts, the same shapes the HTTP routes answer:
- encode        -> {"meta_latents": [{"id": int, "weight": float, "label": str}, ...], "fvu": float}
- activations   -> {"tokens": [str, ...], "top": [[{"latent": int, "activation": float, "label": str}, ...], ...]}
- start_stitch  -> {"job_id": str}
- job           -> {"id": str, "status": "queued"|"running"|"done"|"failed"|"cancelled", "progress": float (0..1),
                    "message": str, "result": dict | None}
- health        -> {"status": "loading"|"ready", "device": str, ...}
Errors raise BackendError with the service's message (and HTTP status where there is one).
"""

from __future__ import annotations

from typing import Protocol


class BackendError(RuntimeError):
    """A request the backend refused or could not serve; `status` is the HTTP status when there is one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Backend(Protocol):
    def health(self) -> dict: ...

    def encode(self, *, width: int | None = None, latent: int | None = None,
               vector: list[float] | None = None) -> dict: ...

    def activations(self, text: str, width: int, top_k: int = 5) -> dict: ...

    def start_stitch(self, small: int, large: int, *, text: str | None = None, n_tokens: int | None = None,
                     metrics: tuple[str, ...] = ("mse", "ce")) -> dict: ...

    def job(self, job_id: str) -> dict: ...

    def cancel(self, job_id: str) -> dict: ...
