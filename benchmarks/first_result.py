"""Time to first result: what a new dashboard user waits for, against the same request once everything is warm.

    python -m benchmarks.first_result [--atlas PATH] [--tokens 1024] [--json]

Three fresh `metasae backend` processes on loopback (the app's local backend), each timed from its start:
- Live text -> latents: the first /v1/activations answer (loads the model and one SAE on demand), then the
  same request warm;
- a 1024-token stitching evaluation (metrics mse + ce, the Stitching page's default): the first job, then the
  same job warm;
- background loading (METASAE_PRELOAD=1, what the dashboard now asks for when it starts its backend): when
  /health first reports the model loaded, i.e. when a first Live request stops having to wait.

The atlas is `data/` when complete, else the demo-shaped one of `benchmarks.backend` (the real SmolLM2-135M).
Absolute times depend on the machine (on a busy 2-core CPU they are pessimistic); the ratios cold / warm are
the point. Prints a table; with --json one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.backend import pick_atlas
from metasae.backend.client import LocalBackendProcess

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Albert Einstein was a German-born theoretical physicist who developed the theory of relativity."


def _start(atlas: Path, name: str, **env: str) -> tuple[LocalBackendProcess, float]:
    (ROOT / ".cache").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    proc = LocalBackendProcess(atlas, env={"METASAE_IDLE_TIMEOUT_S": "0", **env},
                               log_path=ROOT / ".cache" / f"bench_first_{name}.log")
    proc.wait_ready(300)
    return proc, t0


def live_text(atlas: Path, width: int) -> dict:
    proc, t0 = _start(atlas, "live")
    try:
        proc.client.activations(TEXT, width, top_k=64)
        cold = time.perf_counter() - t0
        t = time.perf_counter()
        proc.client.activations(TEXT, width, top_k=64)
        warm = time.perf_counter() - t
    finally:
        proc.stop()
    return {"live_first_s": round(cold, 2), "live_warm_s": round(warm, 3), "live_ratio": round(cold / warm, 1)}


def evaluation(atlas: Path, small: int, large: int, tokens: int) -> dict:
    proc, t0 = _start(atlas, "stitch")
    try:
        def one() -> dict:
            job = proc.client.wait(proc.client.start_stitch(small, large, n_tokens=tokens)["job_id"], timeout=3600)
            if job["status"] != "done":
                raise RuntimeError(f"stitching job {job['status']}: {job['message']}")
            return job

        one()
        cold = time.perf_counter() - t0
        t = time.perf_counter()
        one()
        warm = time.perf_counter() - t
    finally:
        proc.stop()
    return {"stitch_pair": [small, large], "stitch_tokens": tokens, "stitch_first_s": round(cold, 2),
            "stitch_warm_s": round(warm, 2), "stitch_ratio": round(cold / warm, 1)}


def background(atlas: Path) -> dict:
    proc, t0 = _start(atlas, "preload", METASAE_PRELOAD="1")
    try:
        ready = None
        while time.perf_counter() - t0 < 600:
            if (proc.client.health().get("loaded") or {}).get("model"):
                ready = time.perf_counter() - t0
                break
            time.sleep(0.5)
    finally:
        proc.stop()
    return {"preload_model_loaded_s": None if ready is None else round(ready, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--atlas", help="atlas folder (default: data/ when complete, else the demo-shaped atlas)")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset (fast; only the HTTP path is realistic)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of the stitching evaluation")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from metasae.atlas import read_manifest

    atlas = pick_atlas(argparse.Namespace(atlas=args.atlas, tiny=args.tiny))
    manifest, problems = read_manifest(atlas)
    assert manifest is not None, problems
    widths = sorted(int(s["width"]) for s in manifest["saes"])
    out = {"atlas": str(atlas), "model": manifest["model"]["name"], "cpu_count": os.cpu_count()}
    for part in (lambda: live_text(atlas, widths[0]), lambda: background(atlas),
                 lambda: evaluation(atlas, widths[0], widths[1], args.tokens)):
        got = part()
        out.update(got)
        for k, v in got.items():  # as soon as measured: a long run interrupted still leaves its numbers
            print(f"{k:<24}  {v}", flush=True)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
