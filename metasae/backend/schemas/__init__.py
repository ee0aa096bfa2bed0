"""Pydantic request/response models of the backend's routes (the OpenAPI docs are generated from them)."""

from metasae.backend.schemas.activations import ActivationsRequest, ActivationsResponse, TokenLatent
from metasae.backend.schemas.common import ErrorResponse
from metasae.backend.schemas.encode import EncodeRequest, EncodeResponse, MetaLatentWeight
from metasae.backend.schemas.health import HealthResponse
from metasae.backend.schemas.jobs import JobResponse
from metasae.backend.schemas.stitch import StitchRequest, StitchStarted

__all__ = [
    "ActivationsRequest", "ActivationsResponse", "EncodeRequest", "EncodeResponse", "ErrorResponse",
    "HealthResponse", "JobResponse", "MetaLatentWeight", "StitchRequest", "StitchStarted", "TokenLatent",
]
