"""metasae.family against the full cosine matrix of a small synthetic atlas (every decoder row of every width)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from metasae import family
from metasae.atlas import Atlas
from metasae.sae import Sae
from metasae.synthetic_atlas import make_synthetic_atlas


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Atlas:
    return Atlas.open(make_synthetic_atlas(tmp_path_factory.mktemp("family") / "a", widths=(64, 128, 256)))


@pytest.fixture(scope="module")
def full(atlas):
    """(keys (n, 2) of (width, latent), full cosine matrix (n, n)) built by hand from the weight files."""
    rows, keys = [], []
    for w in atlas.widths:
        W = Sae.load(atlas.sae_path(w)).W_dec.double().numpy()
        rows.append(W / np.linalg.norm(W, axis=1, keepdims=True))
        keys += [(w, i) for i in range(w)]
    U = np.concatenate(rows)
    return np.array(keys), U @ U.T, U


def test_unit_decoders_are_unit_rows_of_the_weights_and_cached(atlas, full):
    keys, _, U = full
    units = family.unit_decoders(atlas)
    assert sorted(units) == atlas.widths
    np.testing.assert_allclose(np.concatenate([units[w] for w in atlas.widths]), U, atol=1e-6)
    assert family.unit_decoder(atlas, 64) is units[64]  # second call: the cached array


def test_a_meta_latents_nearest_latents_in_every_width_match_the_full_matrix(atlas, full):
    keys, _, U = full
    meta = Sae.load(atlas.meta_sae_path()).W_dec.double().numpy()
    units = family.unit_decoders(atlas)
    for m in (0, 3, 31):
        near, best = family.meta_neighbours(units, meta, m, k=4)
        e = meta[m] / np.linalg.norm(meta[m])
        cos = U @ e
        for w in atlas.widths:
            sel = np.flatnonzero(keys[:, 0] == w)
            want = sel[np.argsort(-cos[sel], kind="stable")[:4]]
            got = near[near.sae_width == w]
            assert got["latent"].tolist() == keys[want, 1].tolist()
            np.testing.assert_allclose(got["cos"], cos[want], atol=1e-5)
            assert got["rank"].tolist() == [0, 1, 2, 3]
        i = int(np.argmax(cos))
        assert best == {"sae_width": int(keys[i, 0]), "latent": int(keys[i, 1]), "cos": pytest.approx(cos[i], abs=1e-5)}


def test_family_tree_matches_the_full_matrix(atlas, full):
    keys, C, _ = full
    units = family.unit_decoders(atlas)
    width, latent = 128, 7
    tree = family.family_tree(units, width, latent, k=3)
    r0 = int(np.flatnonzero((keys[:, 0] == width) & (keys[:, 1] == latent))[0])
    assert tree.iloc[0][["sae_width", "latent", "step"]].tolist() == [width, latent, 0]
    for w, step in ((64, -1), (256, 1)):
        sel = np.flatnonzero(keys[:, 0] == w)
        want = sel[np.argsort(-C[r0, sel], kind="stable")[:3]]
        got = tree[tree.sae_width == w]
        assert got["latent"].tolist() == keys[want, 1].tolist() and set(got["step"]) == {step}
        np.testing.assert_allclose(got["cos"], C[r0, want], atol=1e-5)
        assert (got["parent_width"] == width).all() and (got["parent_latent"] == latent).all()
        np.testing.assert_allclose(got["parent_cos"].astype(float), C[r0, want], atol=1e-5)
    # from the smallest width, the tree runs two rungs up: width 256's parents are the width-128 nodes
    tree = family.family_tree(units, 64, 2, k=3)
    mid, top = tree[tree.step == 1], tree[tree.step == 2]
    assert len(mid) == 3 and len(top) == 3 and (top["parent_width"] == 128).all()
    for r in top.itertuples(index=False):
        child = int(np.flatnonzero((keys[:, 0] == 256) & (keys[:, 1] == r.latent))[0])
        cand = [int(np.flatnonzero((keys[:, 0] == 128) & (keys[:, 1] == j))[0]) for j in mid["latent"]]
        best = cand[int(np.argmax(C[child, cand]))]
        assert r.parent_latent == keys[best, 1] and r.parent_cos == pytest.approx(C[child, best], abs=1e-5)
    fig = family.tree_figure(family.with_labels(atlas, tree))
    assert len(fig.data[1].x) == len(tree)


def test_a_latent_can_be_left_out_of_its_own_neighbours(atlas):
    units = family.unit_decoders(atlas)
    near = family.nearest(units, units[128][7], k=2, skip=(128, 7))
    assert 7 not in near[near.sae_width == 128]["latent"].tolist()
    assert near[near.sae_width == 64]["cos"].iloc[0] < 1.0 + 1e-6


def test_fast_on_a_bundled_size_ladder():
    """Widths 576..4608 at d_model 576 (the bundled atlas's shape): one meta-latent and one tree well under 50 ms."""
    rng = np.random.default_rng(0)
    units = {w: family.unit_rows(rng.normal(size=(w, 576))) for w in (576, 1152, 2304, 4608)}
    meta = rng.normal(size=(1152, 576)).astype(np.float32)
    family.meta_neighbours(units, meta, 0)
    t = time.perf_counter()
    for m in range(10):
        family.meta_neighbours(units, meta, m)
        family.family_tree(units, 1152, m, k=3)
    assert (time.perf_counter() - t) / 10 < 0.05
