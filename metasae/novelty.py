"""How novel a larger SAE's latents are, and the baselines that say what such a number means.

The paper's definition of a novel latent is functional: it "improves performance when added to the smaller SAE"
(inserting it lowers MSE). The decoder cosine (no smaller latent at cos >= 0.7) is the authors' cheap proxy. Both
are reported among *live* latents only (a dead latent is neither), next to the same numbers for two SAEs of the
*same* width trained with different seeds: what non-convergence alone gives, since a converged pair of seeds
should share almost every latent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from metasae import stitching as st
from metasae.sae import Sae


def live_mask(sae: Sae, acts: torch.Tensor, chunk: int = 8192) -> np.ndarray:
    """(width,) True for latents that fire at least once on `acts`."""
    fired = torch.zeros(sae.width, dtype=torch.bool)
    with torch.no_grad():
        for b in range(0, acts.shape[0], chunk):
            fired |= (sae.encode(acts[b:b + chunk].float()) > 0).any(0)
    return fired.numpy()


def functional_novel(delta_mse: np.ndarray, live: np.ndarray) -> np.ndarray:
    """(L,) True where a live large latent lowers the small SAE's MSE when inserted into it."""
    return live & (np.asarray(delta_mse) < 0)


def novel_fractions(delta_mse: np.ndarray, nearest_cos: np.ndarray, live: np.ndarray,
                    threshold: float) -> dict[str, float]:
    """Functional and cosine-proxy novel fractions among live large latents, and their agreement."""
    live = np.asarray(live, dtype=bool)
    n = int(live.sum())
    func = functional_novel(delta_mse, live)
    cos_novel = live & (np.asarray(nearest_cos) < threshold)
    frac = (lambda m: float(m.sum() / n)) if n else (lambda m: float("nan"))
    return {"n_live_large": n, "novel_frac_functional": frac(func), "novel_frac_cos_live": frac(cos_novel),
            # how far the proxy agrees with the definition: of the cosine-novel, the share that really help
            "cos_novel_that_help": float((func & cos_novel).sum() / max(int(cos_novel.sum()), 1)),
            "cos_recon_that_help": float((func & ~cos_novel & live).sum() / max(int((~cos_novel & live).sum()), 1))}


def seed_baseline(a: Sae, b: Sae, acts: torch.Tensor, threshold: float) -> dict[str, float]:
    """Two SAEs of the same width, other seeds: the novel fractions that non-convergence alone produces.

    `mismatch_frac`: live latents of `b` with no live latent of `a` at cos >= threshold (the cosine proxy);
    `novel_frac_functional`: live latents of `b` whose insertion into `a` lowers MSE (the paper's definition).
    """
    live_a, live_b = live_mask(a, acts), live_mask(b, acts)
    ua, ub = a.unit_decoder().float()[torch.as_tensor(live_a)], b.unit_decoder().float()
    best = (ub @ ua.T).max(1).values.numpy() if live_a.any() else np.full(b.width, -1.0)
    sp = st.sparse_acts(a, b, acts)
    d = st.latent_delta_mse(a, b, sp).numpy()
    fr = novel_fractions(d, best, live_b, threshold)
    return {"width": a.width, "threshold": threshold, "n_live": fr["n_live_large"],
            "mismatch_frac": fr["novel_frac_cos_live"], "median_max_cos": float(np.median(best[live_b])),
            "novel_frac_functional": fr["novel_frac_functional"]}


def monotone_frac(mse: np.ndarray, rtol: float = 1e-6) -> float:
    """Share of interpolation steps whose MSE does not rise above the step before (ties count as not rising)."""
    mse = np.asarray(mse, dtype=np.float64)
    if len(mse) < 2:
        return float("nan")
    d = np.diff(mse)
    return float((d <= rtol * np.abs(mse[:-1]).max()).mean())


def group_path_mse(curve: pd.DataFrame) -> np.ndarray:
    """An interpolation curve's MSE at its start and after each group, in order: the steps `monotone_frac` counts
    (the final row, the large SAE's own b_dec, is not a group)."""
    return curve[curve.action.isin(["start", "add", "swap", "remove"])].mse.to_numpy()


def slot_shares(sae: Sae, acts: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Density classes of latents and the share of all active (token, latent) slots each class takes."""
    fires = torch.zeros(sae.width, dtype=torch.float64)
    with torch.no_grad():
        for b in range(0, acts.shape[0], chunk):
            fires += (sae.encode(acts[b:b + chunk].float()) > 0).sum(0).double()
    density = (fires / max(acts.shape[0], 1)).numpy()
    slots = fires.numpy()
    total = max(slots.sum(), 1.0)
    return {"n_dead": int((density == 0).sum()), "n_rare": int(((density > 0) & (density < 1e-4)).sum()),
            "n_dense": int((density > 0.1).sum()), "n_always_on": int((density > 0.9).sum()),
            "always_on_share": float(slots[density > 0.9].sum() / total),
            "dense_share": float(slots[density > 0.1].sum() / total)}


def family_match(m: st.Match) -> st.Match:
    """Coarser groups for a baseline: every small latent with all the large latents nearest to it (its family).

    Small latents that are no large latent's nearest join the family of their own nearest large latent. If even
    whole families raise MSE when swapped alone, the larger SAE's gain comes from its latents together, and no
    order of groups gives a monotone stitching curve.
    """
    from dataclasses import replace

    S, L = m.n_small, m.n_large
    parent = np.asarray(m.nearest_small)
    orphan = np.setdiff1d(np.arange(S), parent)
    rows = np.concatenate([parent, orphan])
    cols = np.concatenate([S + np.arange(L), S + np.asarray(m.nearest_large)[orphan]])
    group, n_groups = st.components(S + L, rows, cols)
    return replace(m, group=group, n_groups=n_groups)
