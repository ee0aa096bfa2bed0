"""Compare AuxK dead-latent windows: train one width of a build's ladder once per window, same seed and data.

    python scripts/dead_window.py WORK_DIR OUT_DIR --width 4608 --tokens 1500000 --windows none 20480

Each run trains like the build's ladder stage (the work folder's config and shared centre; seed 3 for 4608, the
rung's own) in its own single-threaded process, then reports held-out FVU and L0 (the build's evaluation tokens)
and dead / below-1e-4 / dense latents on the first 4096 contexts. The result for the bundled atlas is in
docs/architecture.md.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import replace
from pathlib import Path

import torch

from metasae.activations import ActivationStore
from metasae.novelty import slot_shares
from metasae.parallel import run_jobs
from metasae.pipeline.context import n_eval_ctx
from metasae.pipeline.stages import ladder_jobs, read_work_config
from metasae.sae import Sae
from metasae.train import evaluate_sae, train_ladder


def train_one(work: Path, out: Path, width: int, tokens: int, window: int | None) -> dict:
    cfg = read_work_config(work)
    seed = next(j[2] for j in ladder_jobs(cfg) if j[1] == width)
    tc = replace(cfg.train.train_config(cfg.seed), n_tokens=tokens, dead_window_tokens=window)
    folder = out / f"window_{window}"
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.train.center_mean and not (folder / "dense.safetensors").is_file():
        (folder / "dense.safetensors").write_bytes((work / "saes" / "dense.safetensors").read_bytes())
    store = ActivationStore.open(work / "acts")
    train_ladder(store, [width], tc, folder, hook=cfg.hook, model=store.meta["model"], eval_ctx=n_eval_ctx(cfg),
                 progress=False, center_mean=cfg.train.center_mean, dense_pcs=cfg.train.dense_pcs, seeds=[seed])
    sae = Sae.load(folder / str(width))
    ev = evaluate_sae(sae, store.flat(n_eval_ctx(cfg), cfg.train.max_norm_ratio))
    acts = store.flat(4096, cfg.train.max_norm_ratio)
    shares = slot_shares(sae, acts)
    return {"window_tokens": window, "width": width, "tokens": tokens, "fvu": ev["fvu"], "l0": ev["l0"],
            "density_tokens": len(acts), "dead": shares["n_dead"],
            "below_1e-4": (shares["n_dead"] + shares["n_rare"]) / sae.width, "dense": shares["n_dense"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--tokens", type=int, default=1_500_000)
    ap.add_argument("--windows", nargs="+", default=["none", "20480"])
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    windows = [None if w == "none" else int(w) for w in a.windows]
    torch.set_num_threads(1)
    jobs = [functools.partial(train_one, a.work, a.out, a.width, a.tokens, w) for w in windows]
    for res in run_jobs(jobs, a.workers):
        print(json.dumps(res))


if __name__ == "__main__":
    main()
