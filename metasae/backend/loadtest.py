"""A bounded load test of a running backend (loopback): N concurrent requests, latencies and error count.

Used by tests/backend/test_load.py and `python -m benchmarks.backend`. Every request of a batch is in flight
at once (one asyncio client, one connection per request), so p95 includes the queueing of the whole batch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=float)
    if not len(a):
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "max_ms": float("nan")}
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "max_ms": float(a.max())}


async def _burst(url: str, token: str | None, path: str, bodies: list[dict], timeout: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    lat: list[float] = []
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        async def one(body: dict) -> None:
            t = time.perf_counter()
            try:
                r = await client.post(path, json=body)
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            lat.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    return {"n": len(bodies), "errors": len(errors), "first_errors": errors[:3], "wall_s": wall,
            **percentiles(lat)}


def burst(url: str, path: str, bodies: list[dict], token: str | None = None, timeout: float = 120.0) -> dict:
    """POST every body to `path` at once; {n, errors, first_errors, wall_s, p50_ms, p95_ms, max_ms}."""
    return asyncio.run(_burst(url, token, path, bodies, timeout))


def sequential(url: str, path: str, bodies: list[dict], token: str | None = None, warmup: int = 5) -> dict:
    """POST the bodies one after the other on one keep-alive connection (the latency a single user sees)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    lat, errors = [], 0
    with httpx.Client(base_url=url, headers=headers, timeout=60.0) as client:
        for body in bodies[:warmup]:
            client.post(path, json=body)
        for body in bodies:
            t = time.perf_counter()
            r = client.post(path, json=body)
            lat.append((time.perf_counter() - t) * 1000)
            errors += r.status_code != 200
    return {"n": len(bodies), "errors": errors, **percentiles(lat)}


def load_test(url: str, widths: list[int], n_latents: int, token: str | None = None, n_encode: int = 200,
              n_activations: int = 50, text: str = "The quick brown fox jumps over the lazy dog. " * 2,
              seed: int = 0) -> dict[str, dict]:
    """`n_encode` concurrent /v1/encode (random latents of every width), then `n_activations` /v1/activations."""
    rng = np.random.default_rng(seed)
    enc = [{"width": int(w), "latent": int(rng.integers(min(n_latents, w)))}
           for w in rng.choice(widths, size=n_encode)]
    act = [{"text": f"{i}: {text}", "width": int(widths[i % len(widths)]), "top_k": 5} for i in range(n_activations)]
    return {"encode": burst(url, "/v1/encode", enc, token), "activations": burst(url, "/v1/activations", act, token)}
