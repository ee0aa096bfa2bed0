"""Pydantic request/response models of the backend's routes (the OpenAPI docs are generated from them).

Request bodies are built per atlas (`*_body(AtlasSpec)`): its widths are an enum, its d_model the vector length;
the module-level `*Request` names are the bodies for an atlas not known at start.
"""

from metasae.backend.schemas.activations import (
    ActivationsRequest,
    ActivationsResponse,
    TokenLatent,
    activations_body,
)
from metasae.backend.schemas.common import UNION_TAGS, AtlasSpec, ErrorResponse, Response
from metasae.backend.schemas.encode import EncodeRequest, EncodeResponse, MetaLatentWeight, encode_body
from metasae.backend.schemas.health import HealthResponse
from metasae.backend.schemas.jobs import JobResponse
from metasae.backend.schemas.stitch import StitchRequest, StitchStarted, stitch_body

__all__ = [
    "UNION_TAGS", "ActivationsRequest", "ActivationsResponse", "AtlasSpec", "EncodeRequest", "EncodeResponse",
    "ErrorResponse", "HealthResponse", "JobResponse", "MetaLatentWeight", "Response", "StitchRequest",
    "StitchStarted", "TokenLatent", "activations_body", "encode_body", "stitch_body",
]
