"""Issue 12 in the dashboard: the intervention lab page (driven through the real /v1/intervene route in process,
on the synthetic atlas's SAEs with the tiny Llama), decomposability on the latent page and in search, and the
ladder-wide neighbours on the latent and meta-latent pages."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from app_helpers import links, texts
from fastapi.testclient import TestClient

from metasae import family
from metasae.atlas import Atlas, read_manifest, write_manifest
from metasae.backend.contract import BackendError


class LabBackend:
    """The page's backend: health as for the synthetic atlas, intervene through the real route (TestClient)."""

    def __init__(self, client: TestClient):
        self.client, self.bodies = client, []

    def health(self) -> dict:
        return {"status": "ready", "device": "cpu", "model": "synthetic"}

    def intervene(self, **body) -> dict:  # HttpBackend.intervene's keywords
        self.bodies.append(body)
        r = self.client.post("/v1/intervene", json=body)
        if r.status_code >= 400:
            raise BackendError(r.json()["detail"], status=r.status_code)
        return r.json()


@pytest.fixture(scope="module")
def lab_client(synthetic_atlas, tmp_path_factory):
    from metasae.backend.app import create_app
    from metasae.backend.config import Settings
    from metasae.backend.resources import Resources

    out = tmp_path_factory.mktemp("lab") / "atlas"
    shutil.copytree(synthetic_atlas, out)
    manifest, _ = read_manifest(out)
    manifest["model"] = {"name": "tiny-llama-0", "source": "tiny:llama:0", "hook": "blocks.1.hook_resid_pre",
                         "d_model": 32}
    write_manifest(out, manifest)
    settings = Settings.from_env(atlas=str(out), idle_timeout_s=0)
    res = Resources(settings, device="cpu")
    res.open_atlas()
    with TestClient(create_app(settings, res, background=False), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture
def lab(monkeypatch, lab_client):
    import metasae.ui as ui

    fake = LabBackend(lab_client)
    monkeypatch.setattr("metasae.app_state.get_backend", lambda *a, **k: (fake, None))
    ui._backend.clear()
    yield fake
    ui._backend.clear()


def test_the_lab_compares_ablation_with_removing_one_meta_latent(synthetic_atlas, run_page, lab):
    at = run_page(synthetic_atlas, "intervene", width="128", latent="7", targets=" the| of", s="11:0.5", gen="2",
                  timeout=180)
    assert not at.error, [e.value for e in at.error]
    body = lab.bodies[-1]
    assert body["prompt"].endswith("Albert Einstein")  # the top example up to its max-activation token
    assert body["targets"] == [" the", " of"] and body["max_new_tokens"] == 2
    assert [e["name"] for e in body["edits"]] == ["ablate latent 7", "remove meta-latent 3", "sliders"]
    assert body["edits"][2]["meta_scales"] == [{"meta_latent": 11, "scale": 0.5}]
    table = at.dataframe[0].value
    assert table["edit"].tolist() == ["clean", "ablate latent 7", "remove meta-latent 3", "sliders"]
    assert (table["KL (nats)"] >= 0).all() and table.loc[1, "KL (nats)"] > 0
    assert {"Δ log p(' the')", "Δ log p(' of')"} <= set(table.columns)
    assert at.slider(key="iv_s11").value == 0.5 and at.slider(key="iv_s3").value == 1.0
    assert at.selectbox(key="iv_rm").value == 3 and "continues:" in texts(at)
    # the URL decides: another meta-latent to remove, positions where it fires
    at = run_page(synthetic_atlas, "intervene", width="128", latent="7", rm="11", pos="fires", timeout=180)
    assert lab.bodies[-1]["edits"][1]["meta_scales"] == [{"meta_latent": 11, "scale": 0.0}]
    assert lab.bodies[-1]["positions"] == "fires" and not at.error


def test_the_lab_reports_bad_urls_and_backend_refusals(synthetic_atlas, run_page, lab):
    at = run_page(synthetic_atlas, "intervene", width="128", latent="7", s="99:0", timeout=180)
    assert "not in this latent's decomposition" in at.error[0].value
    at = run_page(synthetic_atlas, "intervene", width="128", latent="7", targets="x", prompt="a", timeout=180)
    assert any("prompt: gives 1 token" in e.value for e in at.error)
    # the synthetic meta-SAE's live weights differ from the planted table: meta-latent 20 has weight 0 live
    at = run_page(synthetic_atlas, "intervene", width="128", latent="7", rm="20", timeout=180)
    assert any("edits[1].meta_scales: meta-latent 20 is not in latent 7's decomposition" in e.value for e in at.error)


def test_the_lab_without_a_backend_says_so(synthetic_atlas, run_page, monkeypatch):
    import metasae.ui as ui

    monkeypatch.setattr("metasae.app_state.get_backend", lambda *a, **k: (None, "Backend unavailable: test"))
    ui._backend.clear()
    at = run_page(synthetic_atlas, "intervene", width="64", latent="2")
    assert "Backend unavailable: test" in [w.value for w in at.warning]
    ui._backend.clear()


def test_latent_page_shows_decomposability_the_lab_link_and_the_ladder_tree(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "latent", width="128", latent="7", timeout=120)
    shown = texts(at)
    assert "Meta-SAE FVU: 0.1" in shown and "Meta-latents: 4" in shown
    assert ("intervene", "Edit this latent (intervention lab)", "width=128&latent=7") in links(at)
    tree = next(d.value for d in at.dataframe if "parent_cos" in d.value.columns)
    want = family.family_tree(family.unit_decoders(Atlas.open(synthetic_atlas)), 128, 7, k=3).iloc[1:]
    assert tree["latent"].tolist() == want["latent"].tolist() and set(tree["sae_width"]) == {64, 256}


def test_meta_latent_page_shows_nearest_latents_in_every_width(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "meta_latent", meta="3", timeout=120)
    near = next(d.value for d in at.dataframe if "cos" in d.value.columns and "rank" in d.value.columns)
    assert sorted(set(near["sae_width"])) == [64, 128, 256] and len(near) == 15
    top = near[near["rank"] == 0].sort_values("cos").iloc[-1]
    assert f"Best matched at **width {int(top.sae_width)}**: latent {int(top.latent)}" in texts(at)
    assert np.all(np.diff(near[near.sae_width == 64]["cos"].to_numpy()) <= 0)


def test_search_by_decomposability(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "search", mode="decomp", order="atomic", w="64", fvu="0.5", timeout=120)
    table = at.dataframe[0].value
    assert (table["sae_width"] == 64).all() and (table["decomp_fvu"] <= 0.5).all()
    assert np.all(np.diff(table["score"].to_numpy()) >= 0)  # most atomic first
    at = run_page(synthetic_atlas, "search", mode="decomp", tmin="3", tmax="2")
    assert "minimum number of meta-latents (3) is above the maximum (2)" in at.error[0].value
