"""Every dashboard page through Streamlit's AppTest, on the planted synthetic atlas, with asserted values."""

from __future__ import annotations

import pytest
from app_helpers import PAGES, links, texts

from metasae.atlas import Atlas
from metasae.synthetic_atlas import PLANTED, PLANTED_META

EINSTEIN = PLANTED["einstein"]  # width 128, latent 7, "Albert Einstein physicist"
CURIE = PLANTED["curie"]


def test_overview_tells_the_two_findings(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas)
    assert at.title[0].value == "Are SAE latents canonical units?"
    text = texts(at)
    assert "Bigger SAEs do not just refine smaller ones" in text and "Latents are not atomic" in text
    assert "Latents: 448" in text  # 64 + 128 + 256
    ladder = at.dataframe[0].value
    assert list(ladder["width"]) == [64, 128, 256]
    assert list(ladder["latents"]) == [64, 128, 256]
    assert ladder["l0"].notna().all() and ladder["mse"].is_monotonic_decreasing
    # the Convergence plot draws the atlas's training_curves table, one line per rung
    import base64
    import json

    import numpy as np

    (fig,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart") if c.proto.id.endswith("training")]
    want = Atlas.open(synthetic_atlas).training_curves()
    assert [t["name"] for t in fig["data"]] == ["width 64", "width 128", "width 256"]
    for trace, (_, rows) in zip(fig["data"], want.groupby("sae_width"), strict=True):
        y = trace["y"]  # plotly ships numeric arrays as base64 typed arrays
        y = np.frombuffer(base64.b64decode(y["bdata"]), dtype=y["dtype"]) if isinstance(y, dict) else y
        assert list(y) == pytest.approx(rows.fvu.tolist(), rel=1e-6)
    assert not at.error


def test_overview_says_where_the_atlas_differs_from_the_paper(synthetic_atlas, run_page):
    """Issue 11.6: each headline number that differs from the paper gets a sentence drawn from the atlas."""
    import json

    m = json.loads((synthetic_atlas / "manifest.json").read_text())
    pairs = m["stitching"]["pairs"]
    func = sum(p["novel_frac_functional"] for p in pairs) / len(pairs)
    live = sum(p["novel_frac_cos_live"] for p in pairs) / len(pairs)
    base = m["stitching"]["seed_baseline"]
    text = texts(run_page(synthetic_atlas))
    assert f"**{func:.0%}** of the live latents on average here are novel by the paper's test" in text
    assert (f"The paper finds ~35% novel on GPT-2; here {func:.0%} by the paper's functional test (inserting the "
            f"latent lowers the smaller SAE's MSE) and {live:.0%} of live latents by the cosine proxy, while two "
            f"training seeds of the same width {base['width']} already leave {base['mismatch_frac']:.0%}") in text
    held = 1 - m["meta_sae"]["heldout_fvu"]
    assert (f"The paper's meta-SAE explains about half of the variance; this one explains {held:.0%} of held-out "
            f"decoder rows (a meta-SAE on random rows: {1 - m['meta_sae']['random_heldout_fvu']:.0%})") in text
    low, high = (1 - m["meta_sae"]["heldout_by_nearest"][i]["heldout_fvu"] for i in (0, -1))
    assert (f"on held-out rows with a sibling among the training rows (cosine ≥ 0.7) it explains {high:.0%}, on rows "
            f"without one (cosine < 0.5) {low:.0%}") in text
    assert "on this atlas it is not measurable" in text  # overlap: null
    assert f"{m['meta_sae']['seed_stability']:.0%} of its meta-latents recur" in text


def test_overview_example_opens_the_showcase_latent_and_counts_latents(synthetic_atlas, run_page):
    """Issue 11.8 and 11.2: the example link is the manifest's showcase latent; dead/rare/dense per width."""
    at = run_page(synthetic_atlas)
    lk = [x for x in links(at) if x[1].startswith("Open ")]
    assert lk == [("latent", "Open 128/7 · Albert Einstein physicist and its decomposition", "width=128&latent=7")]
    counts = at.dataframe[1].value
    assert list(counts["width"]) == [64, 128, 256]
    assert list(counts["dead"]) == [1, 1, 1] and list(counts["dense"]) == [2, 2, 2]
    assert counts["always_on_share"].between(0, 1).all()


def test_overview_of_an_atlas_without_the_new_fields(old_manifest_atlas, run_page):
    """Older atlases still open: no example link, counts computed from the density column, old wording."""
    at = run_page(old_manifest_atlas)
    assert not at.error and not [x for x in links(at) if x[1].startswith("Open ")]
    counts = at.dataframe[1].value
    assert list(counts["dead"]) == [1, 1, 1] and list(counts["dense"]) == [2, 2, 2]
    text = texts(at)
    assert "by the paper's test" not in text and "of them on average here" in text
    assert "two training seeds" not in text and "Same-width baseline" not in text
    assert any("This atlas has no training_curves.parquet" in i.value and "'assemble' stage" in i.value
               for i in at.info)


def test_streamlit_config_hides_the_deploy_menu():
    from pathlib import Path

    import tomllib

    cfg = tomllib.loads((Path(__file__).resolve().parents[2] / ".streamlit" / "config.toml").read_text())
    assert cfg["client"]["toolbarMode"] == "viewer"


def test_latent_deep_link_shows_label_decomposition_family(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "latent", width=str(EINSTEIN["width"]), latent=str(EINSTEIN["latent"]))
    assert at.title[0].value == "Latent 128/7"
    assert at.selectbox(key="pick_width").value == 128 and at.number_input(key="pick_latent").value == 7
    text = texts(at)
    assert f"### {EINSTEIN['label']}" in [m.value for m in at.markdown]
    dec = at.dataframe[0].value
    assert list(dec["meta_latent"]) == list(EINSTEIN["decomposition"]) == [3, 11, 5, 20]
    assert [round(float(w), 4) for w in dec["weight"]] == list(EINSTEIN["decomposition"].values())
    assert list(dec["label"]) == [PLANTED_META[m] for m in (3, 11, 5, 20)]
    lk = links(at)
    # radial graph: a link per meta-latent node (with its weight) and per member-latent node
    assert ("meta_latent", "meta-latent 3 · science (0.50)", "meta=3") in lk
    assert any(page == "latent" and q.startswith("width=") and "latent=7" not in q for page, _, q in lk)
    # family: nearest smaller (64/2 physics, cos 0.97) and larger (256/42 Curie, cos 0.96)
    assert ("latent", "64/2 · physics and physicists  (cos 0.97)", "width=64&latent=2") in lk
    assert ("latent", "256/42 · Marie Curie chemist  (cos 0.96)", "width=256&latent=42") in lk
    assert "reconstruction" in text and not at.error


def test_latent_default_and_pickers_write_the_url(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "latent")
    assert at.title[0].value == "Latent 128/0"
    at.selectbox(key="pick_width").set_value(256).run()
    at.number_input(key="pick_latent").set_value(CURIE["latent"]).run()
    assert at.query_params["width"] == ["256"] or at.query_params["width"] == "256"
    assert str(at.query_params["latent"]).strip("[]'") == "42"
    assert at.title[0].value == "Latent 256/42" and "Marie Curie chemist" in texts(at)


@pytest.mark.parametrize("params, message", [
    ({"width": "999", "latent": "1"}, "Width 999 is not in this atlas (widths: 64, 128, 256)"),
    ({"width": "128", "latent": "100000"}, "Latent 100000 is not in width 128 (it has 128 latents"),
    ({"width": "128", "latent": "-3"}, "Latent -3 is not in width 128"),
    ({"width": "abc", "latent": "7"}, "Width 'abc' in the URL is not a whole number"),
    ({"width": "128", "latent": "7; DROP TABLE"}, "is not a whole number"),
])
def test_latent_bad_url_gives_a_message(synthetic_atlas, run_page, params, message):
    at = run_page(synthetic_atlas, "latent", **params)
    assert [e.value for e in at.error] and message in at.error[0].value
    assert at.title[0].value == "Latent"


def test_meta_latent_page(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "meta_latent", meta="3")
    assert at.title[0].value == "Meta-latent 3"
    text = texts(at)
    assert "science" in text
    lk = links(at)
    # the planted members, with their weights
    members = next(d.value for d in at.dataframe if "weight" in d.value.columns)  # the member table
    weight = {(int(w), int(i)): round(float(x), 4)
              for w, i, x in zip(members["sae_width"], members["latent"], members["weight"], strict=True)}
    assert weight[(128, 7)] == 0.5 and weight[(256, 42)] == 0.4 and weight[(64, 2)] == 0.6
    assert members["weight"].is_monotonic_decreasing
    assert members["open"].iloc[0].startswith("latent?width=")
    assert ("latent", "64/2 · physics and physicists  (weight 0.600)", "width=64&latent=2") in lk
    assert any(page == "meta_latent" and "shared" in label for page, label, _ in lk)  # co-occurring
    assert not at.error


def test_meta_latent_width_filter_and_bad_urls(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "meta_latent", meta="3", mw="128")
    assert set(next(d.value for d in at.dataframe if "weight" in d.value.columns)["sae_width"]) == {128}
    for bad, message in [("9999", "Meta-latent 9999 is not in this atlas"), ("x'--", "is not a whole number")]:
        at = run_page(synthetic_atlas, "meta_latent", meta=bad)
        assert message in at.error[0].value


def test_search_returns_the_planted_latent_first(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "search", q="einstein")
    page, label, query = links(at)[0]
    assert (page, query) == ("latent", "width=128&latent=7")
    assert label.startswith("128/7 · Albert Einstein physicist")
    assert at.dataframe[0].value["label"].iloc[0] == "Albert Einstein physicist"
    # example text: the hidden latent's marker token occurs only in its examples
    at = run_page(synthetic_atlas, "search", q="zyzzogeton")
    assert links(at)[0][2] == "width=64&latent=5" and "example" in links(at)[0][1]


def test_search_typing_a_query_updates_url_and_results(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "search")
    assert "Type a word" in at.info[0].value  # empty search: a message, no table
    at.text_input(key="s_q").input("curie").run()
    assert str(at.query_params["q"]).strip("[]'") == "curie"
    assert links(at)[0][2] == "width=256&latent=42"


def test_search_filters(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "search", q="physic", w="64")
    assert [q for _, _, q in links(at)] == ["width=64&latent=2"]
    at = run_page(synthetic_atlas, "search", q="physic", kind="reconstruction")
    assert [q for _, _, q in links(at)] == ["width=128&latent=7"]
    at = run_page(synthetic_atlas, "search", q="physic", dmin="abc")
    assert "min density 'abc' in the URL is not a number" in at.error[0].value


def test_search_by_meta_decomposition(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "search", mode="meta", metas="3,11", minw="0.2")
    assert [q for _, _, q in links(at)][:2] == ["width=128&latent=7", "width=256&latent=42"]
    assert at.multiselect(key="s_metas").value == [3, 11]
    at = run_page(synthetic_atlas, "search", mode="meta")
    assert "Pick one or more meta-latents" in at.info[0].value


@pytest.mark.parametrize("query", [
    "'; DROP TABLE latents; --", '" OR 1=1 --', "a" * 10_000, "日本語 🙂 \u202e", ".*(a+)+$", "   ", "%00\\x00",
])
def test_search_hostile_input_is_plain_text(synthetic_atlas, run_page, query):
    at = run_page(synthetic_atlas, "search", q=query)
    text = texts(at)
    assert "No latent matches" in text or "Type a word" in text
    if len(query) > 500:
        assert "only its first 500 are searched" in at.warning[0].value
    assert not at.error


def test_stitching_page(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "stitching")
    assert at.selectbox(key="st_pair").value == "64-128"
    text = texts(at)
    assert "Latents of width 128" in text and "Novel latents:" in text
    table = at.dataframe[0].value
    assert len(table) == 128 and set(table["kind"]) == {"novel", "reconstruction"}
    einstein = table[table["latent"] == 7].iloc[0]
    assert einstein["kind"] == "reconstruction" and einstein["nearest_smaller"] == 2
    at = run_page(synthetic_atlas, "stitching", pair="128-256", kind="novel")
    table = at.dataframe[0].value
    assert len(table) and set(table["kind"]) == {"novel"} and 100 in set(table["latent"])  # quantum (novel)
    assert not at.error


@pytest.mark.parametrize("pair, message", [("1-2", "Pair 1-2 is not in this atlas (pairs: 64-128, 128-256)"),
                                           ("abc", "should look like 'small-large'")])
def test_stitching_bad_pair(synthetic_atlas, run_page, pair, message):
    at = run_page(synthetic_atlas, "stitching", pair=pair)
    assert message in at.error[0].value


class FakeBackend:
    """The Backend contract (metasae/backend/contract.py) answered in memory."""

    def __init__(self, model: str = "synthetic"):
        self.model, self.started = model, []

    def health(self) -> dict:
        return {"status": "ready", "device": "cpu", "model": self.model}

    def activations(self, text: str, width: int, top_k: int = 5) -> dict:
        """Per token: the always-on latent width-1 (density 0.6 in the synthetic atlas) first, then two others."""
        tokens = text.split()
        self.top_k = top_k
        return {"tokens": tokens, "top": [[{"latent": width - 1, "activation": 9.0, "label": "always on"}]
                                          + [{"latent": (7 * i + r) % width, "activation": 2.0 - r, "label": f"l{r}"}
                                             for r in range(2)] for i in range(len(tokens))]}

    def start_stitch(self, small, large, *, text=None, n_tokens=None, metrics=("mse", "ce")) -> dict:
        assert (text is None) != (n_tokens is None)  # the service takes exactly one
        self.started.append((small, large, text, n_tokens))
        return {"job_id": "job-1", "status": "queued"}

    def job(self, job_id: str) -> dict:
        small, large = self.started[-1][:2]
        result = {"n_tokens": 4096, "n_ce_tokens": 4098, "n_sink_tokens": 2, "max_norm_ratio": 5.0,
                  "kind": ["novel"] * large, "delta_mse": [-1e-4] * large,
                  "curve": [{"step": 0, "action": "start", "l0": 20.0, "mse": 0.2, "ce_loss": 3.2},
                            {"step": 1, "action": "add", "l0": 28.0, "mse": 0.16, "ce_loss": None}]}
        return {"id": job_id, "status": "done", "progress": 1.0, "message": "done", "result": result,
                "request": {"small": small, "large": large, "n_tokens": 4096, "seed": 0}}

    def cancel(self, job_id: str) -> dict:
        return self.job(job_id)


@pytest.fixture
def backend(monkeypatch):
    """Replace the backend the pages get: yields a setter taking a backend object or a reason string."""
    import metasae.ui as ui

    def use(value):
        answer = (None, value) if isinstance(value, str) else (value, None)
        monkeypatch.setattr("metasae.app_state.get_backend", lambda *a, **k: answer)
        ui._backend.clear()

    yield use
    ui._backend.clear()


def test_stitching_fresh_evaluation_without_backend_says_so(synthetic_atlas, run_page, backend):
    backend("Backend unavailable: test")
    at = run_page(synthetic_atlas, "stitching")
    at.button[0].click().run()  # the form's submit button
    assert "Backend unavailable: test" in texts(at)


def test_stitching_fresh_evaluation_through_the_backend(synthetic_atlas, run_page, backend):
    fake = FakeBackend()
    backend(fake)
    at = run_page(synthetic_atlas, "stitching", pair="64-128")
    at.button[0].click().run()
    assert not at.exception and fake.started == [(64, 128, None, 8192)]
    assert "Fresh evaluation on 4,096 tokens" in at.success[0].value
    fresh = at.dataframe[-1].value
    assert len(fresh) == 128 and {"kind", "stored_kind", "delta_mse", "stored_delta_mse"} <= set(fresh.columns)


def test_fresh_evaluation_is_in_the_url_and_says_why_it_differs(synthetic_atlas, run_page, backend):
    """Issue 11.7 and 11.1: the job is addressable by URL (a reload shows it) and the page says, in words, what
    makes the fresh numbers differ from the stored ones."""
    fake = FakeBackend()
    backend(fake)
    at = run_page(synthetic_atlas, "stitching", pair="64-128")
    at.button[0].click().run()
    assert at.query_params["job"] == ["job-1"] or at.query_params["job"] == "job-1"
    # a new session (a reload, a shared link) with only the URL
    at = run_page(synthetic_atlas, "stitching", pair="64-128", job="job-1")
    assert "Fresh evaluation on 4,096 tokens" in at.success[0].value
    text = texts(at)
    assert "Other tokens: the fresh numbers come from 4,096 tokens of the atlas's corpus (sample seed 0)" in text
    assert "position 0 of every context and 2 attention-sink tokens (norm above 5× the median)" in text
    # a job the backend does not know (restarted) is said so
    def forgotten(job_id):
        raise KeyError(job_id)

    fake.job = forgotten
    at = run_page(synthetic_atlas, "stitching", pair="64-128", job="nope")
    assert "The backend has no evaluation 'nope'" in at.warning[0].value


def test_search_pages_past_100_results(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "search", q="a")
    head = next(m.value for m in at.markdown if m.value.startswith("**Latents 1–100** of "))
    assert int(head.split(" of ")[1].replace(",", "")) > 200
    assert len(at.dataframe[0].value) == 100
    nxt = [x for x in links(at) if x[1] == "Page 2 →"]
    assert nxt == [("search", "Page 2 →", "q=a&page=2")]
    at = run_page(synthetic_atlas, "search", q="a", page="2")
    first = at.dataframe[0].value
    assert any(m.value.startswith("**Latents 101–") for m in at.markdown)
    assert [x for x in links(at) if x[1] == "← Page 1"] == [("search", "← Page 1", "q=a")]
    page1 = run_page(synthetic_atlas, "search", q="a").dataframe[0].value
    pairs = lambda t: set(zip(t["sae_width"], t["latent"], strict=True))  # noqa: E731
    assert not pairs(first) & pairs(page1)  # pages do not overlap
    assert set(page1["flag"]) <= {"", "dead", "dense"}  # the badge column of search results


def test_tables_offer_csv_and_parquet_downloads(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "stitching", pair="64-128")
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels.count("CSV") >= 1 and labels.count("Parquet") >= 1 and labels.count("CSV") == labels.count("Parquet")
    table = at.dataframe[0].value
    assert set(table.loc[table["latent"].isin([61, 62, 63]) | table["latent"].isin([125, 126, 127]), "flag"]) >= {
        "dead", "dense"}


def test_backend_for_another_model_is_refused(synthetic_atlas, run_page, backend):
    backend(FakeBackend(model="gpt2"))
    at = run_page(synthetic_atlas, "live", text="a b", tw="64")
    assert "serves an atlas of model 'gpt2'" in at.warning[0].value


def test_live_decoder_row_compares_with_stored(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "live", width="128", latent="7", timeout=120)
    cmp = at.dataframe[0].value
    stored = {int(m): round(float(w), 4) for m, w in zip(cmp["meta_latent"], cmp["stored"], strict=True)}
    assert {m: stored[m] for m in (3, 11, 5, 20)} == {3: 0.5, 11: 0.3, 5: 0.15, 20: 0.05}
    assert (cmp["live"] >= 0).all() and (cmp["live"] > 0).any()
    assert "Albert Einstein physicist" in texts(at)
    assert not at.error


def test_live_composed_direction_and_vector(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "live", src="expr", expr="128:7 - 0.5*64:2", timeout=120)
    cmp = at.dataframe[0].value
    expected = {int(m): round(float(w), 4) for m, w in zip(cmp["meta_latent"], cmp["stored"], strict=True)}
    assert expected[3] == round(0.5 - 0.5 * 0.6, 4)  # 3 is in both decompositions
    at = run_page(synthetic_atlas, "live", src="expr", expr="128:7 + 999:1")
    assert "Width 999 is not in this atlas" in at.error[0].value
    at = run_page(synthetic_atlas, "live", src="expr", expr="128:7 ; import os")
    assert "Cannot read the direction" in at.error[0].value
    at = run_page(synthetic_atlas, "live", src="vector", vec=",".join(["0.1"] * 32))
    assert not at.error and "the meta-SAE gives" in texts(at)
    at = run_page(synthetic_atlas, "live", src="vector", vec="1, 2, 3")
    assert "has 3 numbers; this atlas's model has d_model = 32" in at.error[0].value


def test_live_text_without_backend_says_so(synthetic_atlas, run_page, backend):
    backend("Backend unavailable: test")
    at = run_page(synthetic_atlas, "live", text="Albert Einstein", tw="128")
    assert "Backend unavailable: test" in [w.value for w in at.warning]


def test_live_text_hides_dense_latents_and_the_first_token_by_default(synthetic_atlas, run_page, backend):
    """Issue 11.2: always-on latents and token 0 no longer flood the per-token top latents; toggles bring them."""
    fake = FakeBackend()
    backend(fake)
    at = run_page(synthetic_atlas, "live", text="Albert Einstein was", tw="128")
    acts = at.dataframe[-1].value
    assert fake.top_k == 64  # enough latents per token that a top 5 is left after hiding dense ones
    assert list(acts["token"].unique()) == ["Einstein", "was"] and len(acts) == 4 and 127 not in set(acts["latent"])
    assert at.toggle(key="lv_hide_dense").value and at.toggle(key="lv_hide_first").value
    assert "Hidden: 1 dense latent (density above 0.1; 3 activations) and the first token ('Albert'" in texts(at)
    at = run_page(synthetic_atlas, "live", text="Albert Einstein was", tw="128", dense="1", first="1")
    acts = at.dataframe[-1].value
    assert len(acts) == 9 and list(acts[acts["rank"] == 0]["latent"]) == [127] * 3
    assert set(acts.loc[acts["latent"] == 127, "flag"]) == {"dense"}
    # a stricter threshold: latent 127 (density 0.6) is kept when only latents above 0.7 count as dense
    at = run_page(synthetic_atlas, "live", text="Albert Einstein was", tw="128", dmax="0.7")
    assert 127 in set(at.dataframe[-1].value["latent"]) and at.number_input(key="lv_dmax").value == 0.7
    assert at.selectbox(key="lv_tw").value == 128 and not at.error


def test_live_text_while_the_backend_loads_shows_progress(synthetic_atlas, run_page, backend):
    class Loading(FakeBackend):
        def health(self) -> dict:
            return {"status": "loading", "model": "synthetic", "loading": ["model"],
                    "loaded": {"model": False, "meta_sae": True, "saes": [64]}}

        def activations(self, *a, **k):
            raise AssertionError("no request while the model loads: it would block the page")

    backend(Loading())
    at = run_page(synthetic_atlas, "live", text="Albert Einstein was", tw="128")
    assert not at.error and not at.exception
    assert "Loading in the background 2/5: now model" in at.get("progress")[0].proto.text


def test_live_one_latent_over_the_text(synthetic_atlas, run_page, backend):
    backend(FakeBackend())
    at = run_page(synthetic_atlas, "live", text="Albert Einstein was", tw="128", tmode="one", tl="14")
    over = at.dataframe[-1].value
    assert list(over["activation"]) == [0.0, 0.0, 2.0]  # 14 = 7 * 2 + 0: the top latent of "was" only
    assert "Latent **128/14** fires on **1** of 3 tokens (peak 2)." in texts(at)
    assert any("rgba(255,140,0,1.00)" in m.value and "was" in m.value for m in at.markdown)


def test_live_long_text_says_what_was_cut(synthetic_atlas, run_page, backend):
    """Issue 11.4: text over the limit is cut with a message naming the limit and how much was dropped."""
    backend(FakeBackend())
    at = run_page(synthetic_atlas, "live", text="word " * 20_000, tw="64")
    assert ("The text has 100,000 characters; the limit is 4,000, so only the first 4,000 are used"
            in at.warning[0].value) and "96,000 characters dropped" in at.warning[0].value
    assert len(at.text_area(key="lv_text").value) == 4000 and not at.text_area(key="lv_text").max_chars
    assert "up to 4,000 characters" in at.text_area(key="lv_text").label


def test_a_huge_latent_id_is_out_of_range_not_malformed(synthetic_atlas, run_page):
    at = run_page(synthetic_atlas, "latent", width="128", latent="99999999999999999999999")
    assert "out of range" in at.error[0].value and "not a whole number" not in at.error[0].value
    at = run_page(synthetic_atlas, "latent", width="128", latent="999999")
    assert "Latent 999999 is not in width 128 (it has 128 latents, numbered 0 to 127)" in at.error[0].value


@pytest.mark.parametrize("page", PAGES)
def test_missing_atlas_gives_a_message_on_every_page(tmp_path, run_page, page):
    at = run_page(tmp_path / "nowhere", page)
    assert "no such folder" in at.error[0].value


@pytest.mark.parametrize("page", ["overview", "latent"])
def test_corrupt_atlas_gives_a_message(corrupt_atlas, run_page, page):
    at = run_page(corrupt_atlas, page)
    msg = at.error[0].value
    assert "not a usable atlas" in msg and "latents.parquet" in msg


def test_missing_bundled_atlas_says_how_to_build_it(tmp_path, run_page, monkeypatch):
    import metasae.app_state as app_state

    monkeypatch.setattr(app_state, "BUNDLED_DIR", tmp_path / "data")
    at = run_page("", "overview")
    assert "The bundled demo atlas is not in" in at.error[0].value
    assert "metasae build --preset demo --out data" in at.error[0].value


def test_several_atlases_switch_in_sidebar(synthetic_atlas, tmp_path, run_page):
    from metasae.synthetic_atlas import make_synthetic_atlas

    other = make_synthetic_atlas(tmp_path / "other", widths=(16, 32), n_meta=8, plant=False, with_weights=False)
    at = run_page(f"{synthetic_atlas},{other}", "latent", width="128", latent="7")
    box = at.sidebar.selectbox(key="atlas_pick")
    assert box.options == ["planted", "other"] and box.value == "planted"
    assert "Albert Einstein physicist" in texts(at)
    assert all("atlas=planted" in q for _, _, q in links(at))  # links keep the atlas
    at = run_page(f"{synthetic_atlas},{other}", "latent", atlas="other", width="32", latent="3")
    assert at.title[0].value == "Latent 32/3" and at.sidebar.selectbox(key="atlas_pick").value == "other"
    at = run_page(f"{synthetic_atlas},{other}", "overview", atlas="nope")
    assert "There is no atlas named 'nope' here" in at.warning[0].value
