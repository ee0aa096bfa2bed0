"""Errors the service turns into HTTP answers, and out-of-memory detection."""

from __future__ import annotations


class ApiError(Exception):
    """A request the service refuses: `status` is the HTTP status, `message` names the field at fault."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def field_error(field: str, message: str, status: int = 422) -> ApiError:
    """An ApiError whose message starts with the body field it is about (`width: ...`)."""
    return ApiError(status, f"{field}: {message}")


def is_oom(exc: BaseException) -> bool:
    """True for CUDA (or CPU allocator) out-of-memory errors."""
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_cuda_cache() -> None:
    """Give cached CUDA blocks back after an OOM so the next request has room (no-op without CUDA)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_message(what: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"out of memory while {what} ({first}); the service freed its cache and lives on: retry with "
            "less text or fewer tokens, or when other jobs have finished")
