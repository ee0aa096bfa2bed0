"""The demo atlas committed in data/: intact, what data/README.md says it is, and the app opens it.

These guard the README's first command (`streamlit run app.py` opens data/) against a half-committed or
edited atlas; the other app tests use planted synthetic atlases.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import texts

from metasae import views
from metasae.atlas import Atlas, verify

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(scope="module")
def bundled() -> Atlas:
    assert (DATA / "manifest.json").is_file(), "data/ holds no atlas: build it with `metasae build --preset demo`"
    return Atlas.open(DATA)


def test_bundled_atlas_verifies_against_its_manifest():
    assert verify(DATA) == []


def test_bundled_atlas_is_the_demo_preset(bundled):
    m = bundled.manifest
    assert m["build"]["preset"] == "demo" and m["model"]["hook"] == "blocks.15.hook_resid_pre"
    assert "SmolLM2" in m["model"]["name"] and m["model"]["d_model"] == 576
    assert bundled.widths == [1152, 2304, 4608, 9216]
    # 3,000,000 tokens asked, cut into whole 128-token contexts: 23,437 of them
    assert m["corpus"]["n_tokens"] > 3_000_000 - m["corpus"]["ctx_len"]
    assert m["meta_sae"]["k"] == 4
    assert sum((DATA / rel).stat().st_size for rel in m["files"]) < 100 * 2**20  # the budget for git


def test_app_opens_the_bundled_atlas_by_default(bundled, run_page):
    at = run_page(DATA, timeout=180)
    ladder = at.dataframe[0].value
    assert list(ladder["width"]) == bundled.widths
    by_width = {s["width"]: s for s in bundled.manifest["saes"]}
    for row in ladder.itertuples():
        assert row.l0 == pytest.approx(by_width[row.width]["l0"], rel=1e-6)
    assert f"{sum(bundled.n_latents(w) for w in bundled.widths):,}" in texts(at)
    assert not at.error and not at.exception


def test_latent_page_of_the_bundled_atlas_shows_the_stored_label(bundled, run_page):
    w = bundled.widths[-1]
    lat = bundled.latents_table(w, ["latent", "label", "density"])
    row = lat[lat["density"] > 0].iloc[0]
    at = run_page(DATA, "latent", timeout=180, width=str(w), latent=str(int(row["latent"])))
    assert at.title[0].value == f"Latent {w}/{int(row['latent'])}"
    shown = views.latent_view(bundled, w, int(row["latent"])).label
    assert shown and f"### {shown}" in [m.value for m in at.markdown]
    assert not at.error
