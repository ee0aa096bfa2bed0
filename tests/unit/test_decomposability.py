"""The decomposability columns of a synthetic atlas and the search by decomposability, against hand computations
(metasae.meta.decomposability itself: tests/unit/test_meta_recipe.py::test_decomposability_matches_a_hand_computation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metasae.app_state import BadInput
from metasae.atlas import Atlas
from metasae.search import SearchIndex, decomp_score
from metasae.synthetic_atlas import PLANTED, make_synthetic_atlas
from metasae.views.search import decomp_search


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Atlas:
    return Atlas.open(make_synthetic_atlas(tmp_path_factory.mktemp("decomp") / "a", with_weights=False))


def test_synthetic_columns_follow_the_stored_decomposition(atlas):
    e = PLANTED["einstein"]
    row = atlas.latent(e["width"], e["latent"])
    w = np.array(list(e["decomposition"].values()))
    p = w / w.sum()
    assert row["decomp_terms"] == 4 and row["decomp_fvu"] == pytest.approx(0.1)
    assert row["decomp_entropy"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)  # 1.142 nats
    t = atlas.latents_table(64, ["latent", "decomp_fvu", "decomp_terms", "decomp_entropy"])
    assert t["decomp_fvu"].between(0, 1).all() and (t["decomp_terms"] == 4).all()
    assert (t["decomp_entropy"] <= math.log(4) + 1e-6).all()


def test_decomp_score_by_hand():
    assert decomp_score(np.array([0.25]), np.array([math.log(2)]))[0] == pytest.approx(0.75 * 0.5)
    assert decomp_score(np.array([1.0, 0.0]), np.array([1.0, 0.0])).tolist() == [0.0, 0.0]  # unexplained; one term


@pytest.mark.parametrize("order", ["composite", "atomic"])
def test_ranking_is_the_brute_force_sort_of_live_latents(atlas, order):
    index = SearchIndex(atlas)
    lat = atlas.tables["latents"].to_pandas()
    lat = lat[(lat.density > 0) & lat.sae_width.isin([128, 256]) & (lat.decomp_fvu <= 0.5)].copy()
    lat["score"] = (1 - lat.decomp_fvu.astype(float)) * (1 - np.exp(-lat.decomp_entropy.astype(float)))
    want = lat.sort_values(["score", "sae_width", "latent"],
                           ascending=[order == "atomic", True, True]).head(20)
    got = index.by_decomposability(order, widths=[128, 256], max_fvu=0.5, limit=20)
    assert list(zip(got.sae_width, got.latent, strict=True)) == list(zip(want.sae_width, want.latent, strict=True))
    np.testing.assert_allclose(got.score, want.score, rtol=1e-6)
    assert {"decomp_fvu", "decomp_terms", "decomp_entropy"} <= set(got.columns)
    assert index.by_decomposability(order, min_terms=5).empty  # every synthetic latent has 4
    with pytest.raises(ValueError, match="order"):
        index.by_decomposability("sideways")


def test_views_explain_a_missing_score_and_bad_bounds(atlas, tmp_path):
    old = make_synthetic_atlas(tmp_path / "old", with_weights=False)
    t = Atlas.open(old)
    t.tables["latents"] = t.tables["latents"].drop_columns(["decomp_fvu", "decomp_terms", "decomp_entropy"])
    out = decomp_search(SearchIndex(t), "composite")
    assert out.results.empty and "rebuild" in out.message
    with pytest.raises(BadInput, match="minimum number of meta-latents"):
        decomp_search(SearchIndex(atlas), "atomic", min_terms=3, max_terms=2)
