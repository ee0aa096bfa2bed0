"""Novel fractions, the same-width seed baseline, monotone paths and slot shares on planted SAEs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metasae import novelty
from metasae import stitching as st
from metasae.sae import Sae

D = 16


def _sae(W_dec: torch.Tensor, bias: float = -0.5) -> Sae:
    """A ReLU SAE whose encoder is its unit decoder (latent j fires when x leans along d_j)."""
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return Sae(W_enc=W_dec.T.contiguous(), b_enc=torch.full((len(W_dec),), bias), W_dec=W_dec.contiguous(),
               b_dec=torch.zeros(D), hook_name="blocks.0.hook_resid_pre")


@pytest.fixture(scope="module")
def planted():
    """Data made of 24 sparse atoms; the small SAE knows 12 of them, the large one all 24."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T  # 16 orthonormal directions
    atoms = torch.cat([atoms, -atoms[:8]])  # 24 atoms: 16 + 8 opposite ones
    n = 4000
    coef = (torch.rand(n, len(atoms), generator=g) < 0.08).float() * (1 + torch.rand(n, len(atoms), generator=g))
    x = coef @ atoms
    return atoms, x


def test_functional_novel_fraction_finds_the_missing_atoms(planted) -> None:
    atoms, x = planted
    small, large = _sae(atoms[:12]), _sae(atoms)
    sp = st.sparse_acts(small, large, x)
    d = st.latent_delta_mse(small, large, sp).numpy()
    live = novelty.live_mask(large, x)
    m = st.match(small, large, 0.7)
    fr = novelty.novel_fractions(d, m.nearest_small_cos, live, 0.7)
    # the 12 atoms the small SAE lacks lower its MSE when inserted; the 12 it has would double-count and raise it
    assert novelty.functional_novel(d, live).tolist() == [False] * 12 + [True] * 12
    assert fr["novel_frac_functional"] == pytest.approx(0.5)
    assert fr["novel_frac_cos_live"] == pytest.approx(0.5)
    assert fr["cos_novel_that_help"] == 1.0 and fr["cos_recon_that_help"] == 0.0


def test_dead_latents_are_neither_novel_nor_counted(planted) -> None:
    atoms, x = planted
    dead_row = torch.randn(1, D)
    large = _sae(torch.cat([atoms, dead_row]), bias=-0.5)
    large.b_enc[-1] = -1e6  # never fires
    live = novelty.live_mask(large, x)
    assert live.sum() == len(atoms) and not live[-1]
    fr = novelty.novel_fractions(np.r_[np.full(len(atoms), -1.0), -5.0], np.zeros(len(atoms) + 1), live, 0.7)
    assert fr["n_live_large"] == len(atoms) and fr["novel_frac_functional"] == 1.0


def test_seed_baseline_same_sae_matches_everything_random_matches_nothing(planted) -> None:
    atoms, x = planted
    a = _sae(atoms)
    same = novelty.seed_baseline(a, _sae(atoms.clone()), x, 0.7)
    assert same["mismatch_frac"] == 0.0 and same["median_max_cos"] == pytest.approx(1.0)
    assert same["novel_frac_functional"] == 0.0  # inserting a copy of a latent never helps
    g = torch.Generator().manual_seed(5)
    other = novelty.seed_baseline(a, _sae(torch.randn(24, D, generator=g)), x, 0.7)
    # brute force: max |cos| of random directions in 16-d against 24 atoms rarely reaches 0.7
    ub = torch.nn.functional.normalize(_sae(torch.randn(24, D, generator=torch.Generator().manual_seed(5))).W_dec, dim=1)
    live_b = novelty.live_mask(_sae(torch.randn(24, D, generator=torch.Generator().manual_seed(5))), x)
    best = (ub @ torch.nn.functional.normalize(atoms, dim=1).T).max(1).values.numpy()
    assert other["mismatch_frac"] == pytest.approx(float((best[live_b] < 0.7).mean()))
    assert other["mismatch_frac"] > 0.8


def test_group_path_mse_keeps_the_start_and_the_group_steps_in_order() -> None:
    import pandas as pd

    curve = pd.DataFrame({"action": ["start", "add", "swap", "remove", "add", "bias"],
                          "mse": [5.0, 4.0, 4.5, 3.0, 2.0, 1.0]})
    assert novelty.group_path_mse(curve).tolist() == [5.0, 4.0, 4.5, 3.0, 2.0]  # the b_dec swap is no group
    assert novelty.monotone_frac(novelty.group_path_mse(curve)) == 0.75


def test_monotone_frac() -> None:
    assert novelty.monotone_frac(np.array([5.0, 4.0, 4.0, 3.0])) == 1.0
    assert novelty.monotone_frac(np.array([5.0, 6.0, 4.0, 4.5, 1.0])) == 0.5
    assert np.isnan(novelty.monotone_frac(np.array([1.0])))


def test_slot_shares_count_always_on_latents(planted) -> None:
    atoms, x = planted
    sae = _sae(torch.cat([atoms, torch.randn(2, D)]))
    sae.b_enc[-2:] = 1e3  # two always-on latents
    got = novelty.slot_shares(sae, x)
    acts = sae.encode(x) > 0
    slots = acts.sum(0).double()
    assert got["n_always_on"] == 2
    assert got["always_on_share"] == pytest.approx(float(slots[-2:].sum() / slots.sum()))
    assert got["n_dead"] == int((acts.sum(0) == 0).sum())


def test_family_match_puts_each_large_latent_with_its_nearest_small() -> None:
    from metasae.novelty import family_match
    from metasae.stitching import Match

    # small 0 is nearest to large 0, 1; small 1 to large 2; small 2 is nobody's nearest, its nearest large is 2
    m = Match(threshold=0.7, n_small=3, n_large=3, nearest_small=np.array([0, 0, 1]),
              nearest_small_cos=np.array([0.9, 0.3, 0.5]), nearest_large=np.array([0, 2, 2]),
              nearest_large_cos=np.array([0.9, 0.5, 0.2]), group=np.arange(6), n_groups=6, edges=np.zeros((0, 2)))
    f = family_match(m)
    assert f.n_groups == 2
    g = f.group
    assert g[0] == g[3] == g[4]  # small 0 with large 0 and 1
    assert g[1] == g[2] == g[5]  # small 1 with large 2, and orphan small 2 joins large 2's family
    assert g[0] != g[1]
    assert list(f.group_actions()) == ["swap", "swap"]
