"""Meta-SAEs on planted decoder rows: atoms recovered, decompositions find the planted parts, overlap is exact."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from metasae.meta import (
    MetaConfig,
    comembership_overlap,
    decompose,
    decomposition_table,
    meta_fvu,
    train_meta_sae,
)
from metasae.sae import Sae, SaeError

D, N_ATOMS, N_ROWS, TERMS = 32, 64, 4000, 4


@pytest.fixture(scope="module")
def planted():
    """Decoder rows built as weighted sums of 4 of 64 known unit atoms."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(N_ATOMS, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(N_ATOMS, generator=g)[:TERMS] for _ in range(N_ROWS)])
    w = torch.rand(N_ROWS, TERMS, generator=g) * 0.8 + 0.2
    rows = (w[..., None] * atoms[idx]).sum(1)
    meta = train_meta_sae(rows, MetaConfig(width=128, k=TERMS, lr=3e-3, batch_size=256, n_batches=1500),
                          progress=False)
    return atoms, idx, w, rows, meta


def test_meta_sae_recovers_planted_atoms(planted) -> None:
    atoms, _, _, rows, meta = planted
    cos = atoms @ meta.unit_decoder().T
    recovered = (cos.max(1).values >= 0.9).float().mean().item()
    assert recovered >= 0.9, f"only {recovered:.0%} of planted atoms recovered at cos >= 0.9"
    assert meta_fvu(meta, rows) < 0.2


def test_decomposition_names_the_planted_parts(planted) -> None:
    atoms, idx, _, rows, meta = planted
    atom_of_meta = (atoms @ meta.unit_decoder().T).argmax(0)  # best atom for each meta-latent
    weights, ids = decompose(meta, rows[:200])
    hits = []
    for r in range(200):
        top = ids[r][weights[r] > 0][:TERMS]
        hits.append(len(set(atom_of_meta[top].tolist()) & set(idx[r].tolist())) / TERMS)
    assert np.mean(hits) >= 0.8
    # sorted by weight, zero padded
    assert (weights[:, :-1] >= weights[:, 1:]).all()


def test_meta_fvu_matches_formula(planted) -> None:
    _, _, _, rows, meta = planted
    x = rows[:500]
    ref = ((x - meta.reconstruct(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert meta_fvu(meta, x) == pytest.approx(float(ref), rel=1e-5)


def test_decomposition_table_covers_every_width(planted) -> None:
    *_, meta = planted
    saes = [Sae(W_enc=torch.randn(D, w), b_enc=torch.zeros(w), W_dec=torch.randn(w, D), b_dec=torch.zeros(D))
            for w in (8, 16)]
    t = decomposition_table(meta, saes)
    assert set(t.sae_width) == {8, 16}
    assert t.groupby("sae_width").latent.nunique().to_dict() == {8: 8, 16: 16}
    for (w, lat), grp in t.groupby(["sae_width", "latent"]):
        row = saes[0 if w == 8 else 1].W_dec[lat]
        ref_w, ref_i = decompose(meta, row / row.norm())  # the table decomposes directions (unit rows)
        keep = ref_w[0] > 0
        assert grp.sort_values("rank").meta_latent.tolist() == ref_i[0][keep].tolist()
        assert grp.sort_values("rank").weight.to_numpy() == pytest.approx(ref_w[0][keep].numpy(), rel=1e-6)


def test_comembership_overlap_brute_force(monkeypatch) -> None:
    # large latents 0..5; meta-latent 0 holds {0,1,2}, meta 1 holds {3,4}; stitching groups: {0,1} via small 0,
    # {3,5} via small 1, latent 2 and 4 novel
    import metasae.meta as mt

    monkeypatch.setattr(mt, "MIN_STITCH_PAIRS", 1)
    decomp = pd.DataFrame({"sae_width": 6, "latent": [0, 1, 2, 3, 4], "meta_latent": [0, 0, 0, 1, 1],
                           "weight": 1.0, "rank": 0})
    n_small = 2
    group = np.array([0, 1, 0, 0, 2, 1, 3, 1])  # small 0,1 then large 0..5
    got = comembership_overlap(decomp, 6, group, n_small)
    M = {(0, 1), (0, 2), (1, 2), (3, 4)}
    S = {(0, 1), (3, 5)}
    assert got["pairs_meta"] == len(M) and got["pairs_stitch"] == len(S)
    assert got["overlap_of_meta"] == pytest.approx(len(M & S) / len(M))
    assert got["overlap"] == pytest.approx(len(M & S) / len(S))
    assert got["jaccard"] == pytest.approx(len(M & S) / len(M | S))
    assert set(itertools.chain(*M)) == {0, 1, 2, 3, 4}


def test_bad_input(planted) -> None:
    *_, meta = planted
    with pytest.raises(SaeError, match="dimension 5"):
        decompose(meta, torch.randn(3, 5))
    with pytest.raises(SaeError, match="NaN"):
        decompose(meta, torch.full((D,), float("nan")))
    with pytest.raises(SaeError, match="NaN"):
        train_meta_sae(torch.full((10, D), float("inf")))
    with pytest.raises(SaeError, match="at least two"):
        train_meta_sae(torch.randn(1, D))
