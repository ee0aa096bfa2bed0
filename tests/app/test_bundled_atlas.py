"""The demo atlas committed in data/: intact, what data/README.md says it is, and the app opens it.

These guard the README's first command (`streamlit run app.py` opens data/) against a half-committed or
edited atlas; the other app tests use planted synthetic atlases.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import texts

from metasae.atlas import Atlas, verify
from metasae.pipeline.presets import from_preset
from metasae.views.latent import latent_view

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(scope="module")
def bundled() -> Atlas:
    assert (DATA / "manifest.json").is_file(), "data/ holds no atlas: build it with `metasae build --preset demo`"
    return Atlas.open(DATA)


def test_bundled_atlas_verifies_against_its_manifest():
    assert verify(DATA) == []


def test_bundled_atlas_is_the_demo_preset(bundled):
    m = bundled.manifest.to_dict()  # the stored JSON, as a reader of the file sees it
    assert m["build"]["preset"] == "demo" and m["model"]["hook"] == "blocks.15.hook_resid_pre"
    assert "SmolLM2" in m["model"]["name"] and m["model"]["d_model"] == 576
    assert bundled.widths == [576, 1152, 2304, 4608]
    # 1,998,848 tokens: 61 whole shards of 256 contexts of 128 tokens
    assert m["corpus"]["n_tokens"] == 1_998_848
    demo = from_preset("demo")
    assert (m["meta_sae"]["k"], m["meta_sae"]["width"]) == (demo.meta.k, demo.meta.width) == (4, 2304)
    assert m["build"]["config"]["train_dead_window_tokens"] == demo.train.dead_window_tokens == 20_480


def test_bundled_atlas_carries_its_baselines_and_showcase(bundled):
    """The numbers issue 10 asks for are in the manifest, each beside its baseline, and the showcase exists."""
    m = bundled.manifest.to_dict()  # the stored JSON, as a reader of the file sees it
    base = m["stitching"]["seed_baseline"]
    assert base["width"] == 576 and 0 <= base["mismatch_frac"] <= 1 and 0 <= base["novel_frac_functional"] <= 1
    for p in m["stitching"]["pairs"]:
        assert 0 <= p["novel_frac_functional"] <= 1 and 0 <= p["novel_frac_cos_live"] <= 1
        assert 0 <= p["monotone_frac"] <= 1
    ms = m["meta_sae"]
    assert ms["random_heldout_fvu"] > ms["heldout_fvu"]  # the meta-SAE beats random directions on held-out rows
    assert {s["role"] for s in m["showcase"]} == {"person", "nationality", "science"}
    for s in m["showcase"]:
        assert bundled.latent(s["width"], s["latent"])["label"] == s["label"]
        assert len(s["seeds"]) == 3
    assert sum((DATA / rel).stat().st_size for rel in m["files"]) < 100 * 2**20  # the budget for git


def test_app_opens_the_bundled_atlas_by_default(bundled, run_page):
    at = run_page(DATA, timeout=180)
    ladder = at.dataframe[0].value
    assert list(ladder["width"]) == bundled.widths
    by_width = {s.width: s for s in bundled.manifest.saes}
    for row in ladder.itertuples():
        assert row.l0 == pytest.approx(by_width[row.width].l0, rel=1e-6)
    assert f"{sum(bundled.n_latents(w) for w in bundled.widths):,}" in texts(at)
    assert not at.error and not at.exception


def test_latent_page_of_the_bundled_atlas_shows_the_stored_label(bundled, run_page):
    w = bundled.widths[-1]
    lat = bundled.latents_table(w, ["latent", "label", "density"])
    row = lat[lat["density"] > 0].iloc[0]
    at = run_page(DATA, "latent", timeout=180, width=str(w), latent=str(int(row["latent"])))
    assert at.title[0].value == f"Latent {w}/{int(row['latent'])}"
    shown = latent_view(bundled, w, int(row["latent"])).label
    assert shown and f"### {shown}" in [m.value for m in at.markdown]
    assert not at.error


def test_bundled_held_out_split_matches_a_fresh_computation(bundled):
    """The manifest's held-out split by nearest training row, recomputed from the atlas's own (fp16) SAEs, densities
    and meta-SAE with the build's recipe: the stored and the fresh numbers agree."""
    from metasae import meta as mt
    from metasae.sae import Sae

    ms = bundled.manifest.meta_sae
    saes = [Sae.load(DATA / "saes" / str(w)) for w in bundled.widths]
    dens = {w: bundled.latents_table(w, ["density"])["density"].to_numpy() for w in bundled.widths}
    rc = mt.recipe([(s.width, s.W_dec.float(), dens[s.width]) for s in saes],
                   mt.RowFilter(ms.rows.min_density, ms.rows.max_density), pooled=ms.rows.source == "pooled",
                   n_seeds=1, seed=bundled.manifest.build.seed)
    job = rc.jobs["seed0"]
    assert (len(job.split.train), len(job.split.heldout)) == (ms.rows.n_train, ms.rows.n_heldout)
    fresh = mt.heldout_by_nearest(Sae.load(DATA / "meta_sae"), job.train_rows, job.heldout_rows)
    assert sum(b["n"] for b in fresh) == sum(b.n for b in ms.heldout_by_nearest) == ms.rows.n_heldout
    for new, old in zip(fresh, ms.heldout_by_nearest, strict=True):
        assert (new["lo"], new["hi"]) == (old.lo, old.hi)
        assert abs(new["n"] - old.n) <= 3  # fp16 weights move a cosine across a bin edge now and then
        assert new["heldout_fvu"] == pytest.approx(old.heldout_fvu, abs=0.002)
