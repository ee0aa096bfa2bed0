"""Stand-ins for the stitching evaluator, loaded by a backend subprocess through METASAE_STITCH_FN.

Only the cancel / kill / out-of-memory tests use them (they need a job that runs for a known time or fails
in a known way); every test of /v1/stitch results runs the real `metasae.distributed.stitch_eval`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

SECONDS_PER_CONTEXT = 0.1
TOKEN = "test-token-123"


def fake_env() -> dict[str, str]:
    """Environment for a backend whose stitching evaluator is `slow_stitch_eval` below."""
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "METASAE_STITCH_FN": "backend_fakes:slow_stitch_eval"}


class Cancelled(Exception):
    """Like metasae.distributed.Cancelled: the backend looks up `Cancelled` in the evaluator's module."""


def slow_stitch_eval(lm, hook, tokens, small, large, metrics=("mse", "ce"), threshold=0.7, ray_address=None,
                     n_shards=None, progress=None, should_stop=None) -> dict:
    """Sleeps SECONDS_PER_CONTEXT per context row, reporting progress and honouring should_stop.

    Text containing "OOM" raises torch.cuda.OutOfMemoryError after the first row (what a GPU does)."""
    n = tokens.shape[0]
    for i in range(n):
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped at row {i}/{n}")
        if progress is not None:
            progress(i / n, f"row {i}/{n}")
        time.sleep(SECONDS_PER_CONTEXT)
        if i == 0 and bool((tokens == ord("O")).any()) and bool((tokens == ord("M")).any()):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fake)")
    return {"n_tokens": int(tokens.numel()), "kind": ["novel"] * large.width, "group_id": list(range(large.width)),
            "delta_mse": [0.0] * large.width, "group_delta_mse": [0.0] * large.width,
            "curve": [{"step": 0, "action": "start", "l0": 0.0, "mse": 0.0, "ce_loss": None}], "fake": True}
