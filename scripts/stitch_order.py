"""Compare stitching orders on a build's ladder: the build's (each group ranked by its ΔMSE alone) and the exact
greedy one (`metasae.stitching.greedy_order`: each step the group that lowers MSE most after the steps before).

    python scripts/stitch_order.py WORK_DIR [--pairs 576,1152 1152,2304]

Prints, per pair, the share of steps whose MSE does not rise (the atlas's `monotone_frac`), the path's highest MSE
and its highest L0, on the build's evaluation tokens. The result for the bundled atlas is in data/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from metasae import novelty
from metasae import stitching as st
from metasae.activations import ActivationStore
from metasae.pipeline.context import n_eval_ctx
from metasae.pipeline.stages import read_work_config
from metasae.sae import Sae


def compare(work: Path, acts: torch.Tensor, threshold: float, small_w: int, large_w: int) -> list[str]:
    small, large = (Sae.load(work / "saes" / str(w)) for w in (small_w, large_w))
    m = st.match(small, large, threshold)
    sp = st.sparse_acts(small, large, acts)
    lines = []
    for name, order in (("ranked alone (the build)", None), ("exact greedy", st.greedy_order(small, large, m, sp)[0])):
        path = st.interpolate(small, large, m, sp, order=order)
        mse = novelty.group_path_mse(path)
        lines.append(f"{small_w}->{large_w} {name:>24}: MSE does not rise on {novelty.monotone_frac(mse):.1%} of "
                     f"{m.n_groups} steps; highest MSE {mse.max():.0f} (start {mse[0]:.0f}); highest L0 "
                     f"{path.l0.max():.1f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("--pairs", nargs="+", default=None, help="small,large widths (default: every neighbouring pair)")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = read_work_config(a.work)
    widths = cfg.ladder.widths
    pairs = ([tuple(int(w) for w in x.split(",")) for x in a.pairs] if a.pairs
             else list(zip(widths[:-1], widths[1:], strict=True)))
    acts = ActivationStore.open(a.work / "acts").flat(n_eval_ctx(cfg), cfg.train.max_norm_ratio)
    for small_w, large_w in pairs:
        print("\n".join(compare(a.work, acts, cfg.stitching.threshold, small_w, large_w)), flush=True)


if __name__ == "__main__":
    main()
