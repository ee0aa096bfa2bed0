"""Backend benchmark: a real `metasae backend` process on loopback, timed from a client.

    python -m benchmarks.backend --json [--atlas PATH | --tiny] [--device cpu|cuda] [--stitch-tokens N]

Measures
- /v1/encode latency, sequential (what one dashboard user sees; goal p95 <= 50 ms on CPU), and /v1/activations;
- the bounded load test (200 concurrent /v1/encode, then 50 concurrent /v1/activations): errors, p50/p95;
- stitching throughput: tokens per second of one /v1/stitch job (metrics mse + ce) on the atlas's corpus,
  timed inside the job (`result.seconds`: the evaluation without model loading and corpus preparation); the
  same for metrics mse only (`stitch_mse_only_tokens_per_s`: no pass through the rest of the model).

Which atlas: --atlas PATH; else `data/` when it is complete; else a *demo-shaped* atlas generated once under
.cache/ (the real SmolLM2-135M at blocks.15.hook_resid_pre, random SAEs of widths 1152/2304/4608 whose biases
give ~32 active latents per token, like the trained demo ladder); --tiny uses the tiny preset (random-weight
4-layer model: only the HTTP path is realistic there). Prints a table, then (with --json) one JSON object as
the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from metasae.backend.client import LocalBackendProcess
from metasae.backend.loadtest import load_test, sequential

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"encode_p95_ms": 50}
DEMO_WIDTHS = (1152, 2304, 4608)
DEMO_L0 = 32
BENCH_VERSION = 1


def ensure_tiny() -> Path:
    """The tiny-preset atlas under .cache/ (built once, ~1-2 min)."""
    from metasae.atlas import verify
    from metasae.cli import main

    out = ROOT / ".cache" / "bench_backend_tiny"
    if (out / "manifest.json").is_file() and not verify(out, checksums=False):
        return out
    assert main(["build", "--preset", "tiny", "--out", str(out), "--work", str(out.with_name(out.name + ".work")),
                 "--quiet", "--force"]) == 0
    return out


def ensure_demo_shaped() -> Path:
    """A demo-shaped atlas: the synthetic atlas's tables, SmolLM2 as model, SAEs sized and biased like the demo's."""
    import torch

    from metasae.atlas import read_manifest, verify, write_manifest
    from metasae.corpus import build_contexts
    from metasae.lm import LanguageModel
    from metasae.sae import Sae
    from metasae.synthetic_atlas import make_synthetic_atlas

    out = ROOT / ".cache" / "bench_backend_demo"
    manifest, _ = read_manifest(out)
    if manifest and manifest.get("build", {}).get("bench_backend") == BENCH_VERSION and not verify(out, False):
        return out
    print("generating the demo-shaped benchmark atlas (once) ...", file=sys.stderr)
    hook, d = "blocks.15.hook_resid_pre", 576
    make_synthetic_atlas(out, widths=DEMO_WIDTHS, n_meta=224, k=4, n_examples=2, ctx=8, d_model=d,
                         with_weights=True, overwrite=True)
    lm = LanguageModel.load("smollm2")
    with torch.no_grad():
        toks = build_contexts(["wiki"], lm.tokenizer, 64, 64 * 16, seed=123)
        x = lm.resid(toks, hook)[:, 1:].reshape(-1, d).float()
    g = torch.Generator().manual_seed(0)
    for w in DEMO_WIDTHS:
        W_dec = torch.randn(w, d, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.T.contiguous()
        pre = x @ W_enc
        b_enc = -torch.quantile(pre, 1 - DEMO_L0 / w, dim=0)  # each latent fires on ~L0/w of the tokens
        sae = Sae(W_enc, b_enc, W_dec, x.mean(0) * 0, hook_name=hook, model_name="SmolLM2-135M-Instruct")
        sae.save(out / "saes" / str(w), dtype="float16")
    manifest, _ = read_manifest(out)
    manifest["model"] = {"name": "SmolLM2-135M-Instruct", "source": "smollm2", "hook": hook, "d_model": d}
    manifest["corpus"] = {"sources": ["wiki"], "n_tokens": 0, "ctx_len": 128}
    manifest["stitching"] = {"threshold": 0.7, "pairs": []}
    manifest["build"]["bench_backend"] = BENCH_VERSION
    write_manifest(out, manifest)
    return out


def pick_atlas(args: argparse.Namespace) -> Path:
    from metasae.atlas import verify

    if args.atlas:
        return Path(args.atlas)
    if args.tiny:
        return ensure_tiny()
    data = ROOT / "data"
    if (data / "manifest.json").is_file() and not verify(data, checksums=False):
        return data
    return ensure_demo_shaped()


def run(args: argparse.Namespace) -> dict:
    from metasae.atlas import read_manifest

    atlas = pick_atlas(args)
    manifest, problems = read_manifest(atlas)
    assert manifest is not None, problems
    widths = sorted(int(s["width"]) for s in manifest["saes"])
    env = {"METASAE_IDLE_TIMEOUT_S": "0", "METASAE_DEVICE": args.device}
    if args.torch_threads:
        env["METASAE_TORCH_THREADS"] = str(args.torch_threads)
    proc = LocalBackendProcess(atlas, env=env, log_path=ROOT / ".cache" / "bench_backend.log")
    out: dict = {"atlas": str(atlas), "model": manifest["model"]["name"], "widths": widths}
    try:
        t0 = time.perf_counter()
        health = proc.wait_ready(300, status=("ready",))
        out.update(device=health["device"], device_name=health["device_name"],
                   startup_s=round(time.perf_counter() - t0, 2))
        be = proc.client
        t = time.perf_counter()
        for w in widths:  # load every SAE, the meta-SAE and the model (first-use cost, reported separately)
            be.encode(width=w, latent=0)
            be.activations("warm up", w)
        out["first_use_load_s"] = round(time.perf_counter() - t, 2)
        rng = np.random.default_rng(0)
        bodies = [{"width": int(w), "latent": int(rng.integers(w))} for w in rng.choice(widths, 300)]
        enc = sequential(proc.url, "/v1/encode", bodies)
        text = "Albert Einstein was a German-born theoretical physicist who developed the theory of relativity."
        act = sequential(proc.url, "/v1/activations", [{"text": text, "width": widths[-1], "top_k": 5}] * 30)
        out.update(encode_p50_ms=round(enc["p50_ms"], 2), encode_p95_ms=round(enc["p95_ms"], 2),
                   encode_errors=enc["errors"], activations_p50_ms=round(act["p50_ms"], 2),
                   activations_p95_ms=round(act["p95_ms"], 2), activations_tokens=len(be.activations(
                       text, widths[-1])["tokens"]))
        load = load_test(proc.url, widths, n_latents=min(widths), n_encode=200, n_activations=50)
        for name, r in load.items():
            out.update({f"load_{name}_n": r["n"], f"load_{name}_errors": r["errors"],
                        f"load_{name}_wall_s": round(r["wall_s"], 2), f"load_{name}_p50_ms": round(r["p50_ms"], 1),
                        f"load_{name}_p95_ms": round(r["p95_ms"], 1)})
        small, large = widths[0], widths[1]
        # mse only first: first-use costs (imports, corpus read) stay out of the timed mse + ce job
        warm = be.wait(be.start_stitch(small, large, n_tokens=args.stitch_tokens, metrics=("mse",))["job_id"],
                       timeout=1800)
        if warm["status"] == "done":
            r = warm["result"]
            out["stitch_mse_only_tokens_per_s"] = round(r["n_tokens"] / r["seconds"], 1)
        job = be.wait(be.start_stitch(small, large, n_tokens=args.stitch_tokens, metrics=("mse", "ce"))["job_id"],
                      timeout=3600)
        if job["status"] != "done":
            raise RuntimeError(f"stitching job {job['status']}: {job['message']}")
        res = job["result"]
        out.update(stitch_pair=[small, large], stitch_tokens=res["n_tokens"], stitch_metrics=["mse", "ce"],
                   stitch_seconds=round(res["seconds"], 2),
                   stitch_tokens_per_s=round(res["n_tokens"] / res["seconds"], 1),
                   stitch_job_seconds=round(job["finished"] - job["started"], 2))
    finally:
        proc.stop()
    out["goals"] = GOALS
    out["encode_goal_met"] = out.get("encode_p95_ms", float("inf")) <= GOALS["encode_p95_ms"]
    out["cpu_count"] = os.cpu_count()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backend", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--atlas", help="atlas folder to serve (default: data/ if complete, else demo-shaped)")
    p.add_argument("--tiny", action="store_true", help="use the tiny preset atlas (fast; HTTP path only)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (METASAE_DEVICE of the backend)")
    p.add_argument("--stitch-tokens", type=int, default=4096, help="tokens of the timed stitching job")
    p.add_argument("--torch-threads", type=int, default=0, help="METASAE_TORCH_THREADS of the backend (0: default)")
    args = p.parse_args(argv)
    out = run(args)
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
