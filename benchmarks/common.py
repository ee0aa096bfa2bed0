"""Timing and peak-memory helpers shared by the benchmarks, and the real-activation fixture they run on."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent


class Measure:
    """Wall time and peak RSS growth (sampled every 5 ms) of a block."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.peak_mb = 0.0


@contextmanager
def measure():
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    m = Measure()
    t = time.perf_counter()
    try:
        yield m
    finally:
        m.seconds = time.perf_counter() - t
        done.set()
        th.join()
        m.peak_mb = (max(peak[0], proc.memory_info().rss) - base) / 2**20


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    """Fastest of a few runs (the machines are noisy) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def real_setup(quick: bool, saes_dir: str | None = None):
    """(lm, hook, tokens, small SAE, large SAE) on real SmolLM2 text.

    Uses trained SAEs from `saes_dir` (width subfolders; default the bundled atlas's data/saes) — trained SAEs
    make the ΔCE comparison meaningful; otherwise trains two small BatchTopK SAEs on the fly (minutes).
    """
    from metasae.atlas import read_manifest
    from metasae.corpus import build_contexts
    from metasae.lm import LanguageModel
    from metasae.sae import Sae

    lm = LanguageModel.load()
    manifest, _ = read_manifest(ROOT / "data")
    hook = manifest["model"]["hook"] if manifest else "blocks.15.hook_resid_pre"
    n_ctx = 48 if quick else 160
    tokens = build_contexts(["wiki"], lm.tokenizer, 128, n_ctx * 128, seed=123)
    folder = Path(saes_dir) if saes_dir else ROOT / "data" / "saes"
    widths = sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit()) if folder.is_dir() else []
    if len(widths) >= 2:
        pair = widths[-2:] if not quick else widths[:2]
        small, large = (Sae.load(folder / str(w)) for w in pair)
    else:
        from metasae.train import TrainConfig, train_sae

        acts = torch.cat([lm.resid(tokens[b:b + 8], hook)[:, 1:].reshape(-1, lm.d_model)
                          for b in range(0, len(tokens), 8)])

        def batches():
            g = torch.Generator().manual_seed(0)
            while True:
                yield acts[torch.randint(0, len(acts), (1024,), generator=g)]

        cfg = TrainConfig(architecture="batchtopk", n_tokens=400_000, batch_size=1024, k=32, lr=1e-3)
        small, large = (train_sae(batches(), lm.d_model, w, cfg, hook=hook, progress=False) for w in (1152, 2304))
    return lm, hook, tokens, small, large
