"""The GPU-backed service (FastAPI) and its client; see docs/deploy.md."""
