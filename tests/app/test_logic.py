"""The dashboard's logic without Streamlit: URL parsing, atlas sources, page data, figures."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from metasae import app_state, plots
from metasae.app_state import BadInput, Term, get_backend, warm_backend
from metasae.atlas import DEAD_LABEL, Atlas, AtlasError
from metasae.search import SearchIndex
from metasae.synthetic_atlas import PLANTED
from metasae.views.badges import badge
from metasae.views.latent import latent_view, node_params, radial_graph
from metasae.views.live import (
    activations_table,
    compare,
    compose,
    encode_live,
    expected_decomposition,
    load_progress,
)
from metasae.views.meta_latent import meta_options, meta_view
from metasae.views.overview import (
    curves,
    findings,
    ladder_table,
    latent_counts,
    max_cos,
    pair_summaries,
    paper_notes,
    path_shape,
    showcase,
)
from metasae.views.render import example_html, styled, to_csv, to_parquet, token_chips
from metasae.views.search import meta_search, text_search
from metasae.views.stitching import pair_summary, stitching_table
from metasae.views.text import MISSING, fmt, show_token
from metasae.weights import load_decoder, load_meta_sae


@pytest.fixture(scope="module")
def atlas(synthetic_atlas) -> Atlas:
    return Atlas.open(synthetic_atlas)


@pytest.fixture(scope="module")
def index(atlas) -> SearchIndex:
    return SearchIndex(atlas)


# --------------------------------------------------------------------------------------------- sources


def test_sources_from_args_env_and_bundled(tmp_path):
    bundled = tmp_path / "data"
    bundled.mkdir()
    a, b = tmp_path / "one", tmp_path / "two" / "atlas"
    b.mkdir(parents=True)
    srcs = app_state.sources_from(["app.py", "--atlas", str(a), f"--atlas={b},user/my-atlas@v2"],
                                  {"METASAE_ATLAS": f"{a}, hf://org/thing"}, bundled=bundled)
    assert [(s.key, s.kind) for s in srcs] == [("one", "folder"), ("two", "folder"), ("my-atlas", "hub"),
                                               ("thing", "hub")]  # a given twice is listed once
    assert not any(s.bundled for s in srcs)  # data/ holds no manifest: not listed when others are
    (bundled / "manifest.json").write_text("{}")
    srcs = app_state.sources_from([], {"METASAE_ATLAS": str(a)}, bundled=bundled)
    assert [s.title for s in srcs] == ["one", "data (bundled demo)"]
    only = app_state.sources_from(["-q", "tests"], {}, bundled=tmp_path / "missing")
    assert len(only) == 1 and only[0].bundled
    dup = app_state.sources_from([], {"METASAE_ATLAS": f"{tmp_path}/x/a,{tmp_path}/y/a"}, bundled=bundled)
    assert [s.key for s in dup][:2] == ["a", "a-2"]


def test_classify_paths_and_hub_ids(tmp_path):
    assert app_state.classify("owner/name") == "hub"
    assert app_state.classify("hf://owner/name@main") == "hub"
    assert app_state.classify(str(tmp_path)) == "folder"
    assert app_state.classify("./rel/path") == "folder"
    assert app_state.classify("a/b/c") == "folder"


def test_open_source_messages(tmp_path, synthetic_atlas, monkeypatch):
    missing = app_state.AtlasSource(str(tmp_path / "data"), "data", "folder", bundled=True)
    with pytest.raises(AtlasError, match="bundled demo atlas is not in"):
        app_state.open_source(missing)
    with pytest.raises(AtlasError, match="no such folder"):
        app_state.open_source(app_state.AtlasSource(str(tmp_path / "x"), "x", "folder"))
    assert app_state.open_source(app_state.AtlasSource(str(synthetic_atlas), "p", "folder")).widths == [64, 128, 256]

    import metasae.hub as hub

    seen = {}

    def fake_pull(repo_id, revision=None, **kw):
        seen.update(repo=repo_id, revision=revision)
        raise AtlasError(f"{repo_id}: could not download")

    monkeypatch.setattr(hub, "pull", fake_pull)
    with pytest.raises(AtlasError, match="could not download"):
        app_state.open_source(app_state.AtlasSource("hf://org/atlas@v1", "atlas", "hub"))
    assert seen == {"repo": "org/atlas", "revision": "v1"}


def test_pick_source():
    srcs = [app_state.AtlasSource("/a", "a", "folder"), app_state.AtlasSource("/b", "b", "folder")]
    assert app_state.pick_source(srcs, None).key == "a"
    assert app_state.pick_source(srcs, "b").key == "b"
    with pytest.raises(BadInput, match="no atlas named 'zz'"):
        app_state.pick_source(srcs, "zz")


# --------------------------------------------------------------------------------------------- URL parsing


def test_parse_numbers():
    assert app_state.parse_int(None, "x") is None and app_state.parse_int(" 12 ", "x") == 12
    assert app_state.parse_float("1e-3", "x") == 1e-3 and app_state.parse_float("", "x") is None
    assert app_state.parse_int_list("64, 128,", "w") == [64, 128]
    with pytest.raises(BadInput, match="out of range"):  # a whole number, just too big (issue 11.4)
        app_state.parse_int("1" * 20, "Latent")
    for bad in ["1.5", "abc", "0x10", "1;DROP"]:
        with pytest.raises(BadInput, match="not a whole number"):
            app_state.parse_int(bad, "Latent")
    for bad in ["nan", "inf", "abc", "1" * 50]:
        with pytest.raises(BadInput, match="not a number"):
            app_state.parse_float(bad, "x")


def test_resolve_latent_meta_pair(atlas):
    assert app_state.resolve_latent(atlas, None, None) == (128, 0)
    assert app_state.resolve_latent(atlas, "256", "42") == (256, 42)
    with pytest.raises(BadInput, match=r"Latent 256 is not in width 256 \(it has 256 latents, numbered 0 to 255\)"):
        app_state.resolve_latent(atlas, "256", "256")
    with pytest.raises(BadInput, match="Width 100 is not in this atlas"):
        app_state.resolve_latent(atlas, "100", "1")
    assert app_state.resolve_meta(atlas, "3") == 3 and app_state.resolve_meta(atlas, None) == 0
    with pytest.raises(BadInput, match="Meta-latent 32 is not in this atlas"):
        app_state.resolve_meta(atlas, "32")
    assert app_state.resolve_pair(atlas, None) == (64, 128)
    assert app_state.resolve_pair(atlas, "128-256") == (128, 256)
    with pytest.raises(BadInput, match="Pair 64-256 is not in this atlas"):
        app_state.resolve_pair(atlas, "64-256")


def test_clean_query():
    assert app_state.clean_query("  Einstein\n") == ("Einstein", None)
    q, warning = app_state.clean_query("x" * 10_000)
    assert len(q) == 500 and "10,000 characters" in warning
    assert app_state.clean_query("a\x00b\u200bc")[0] == "a b c"


def test_parse_direction(atlas):
    assert app_state.parse_direction("128:7 - 0.5*64:2 + 256/42") == [
        Term(1.0, 128, 7), Term(-0.5, 64, 2), Term(1.0, 256, 42)]
    for bad, msg in [("", "Type a direction"), ("128:7 64:2", "Cannot read"), ("__import__('os')", "Cannot read"),
                     ("1:1+" * 200, "characters long"), (" + ".join(["64:1"] * 17), "at most 16")]:
        with pytest.raises(BadInput, match=msg):
            app_state.parse_direction(bad)
    with pytest.raises(BadInput, match="Latent 999 is not in width 64"):
        app_state.parse_direction("64:999", atlas)


def test_parse_vector():
    assert app_state.parse_vector("[1, 2.5\n-3]", 3) == [1.0, 2.5, -3.0]
    for text, msg in [("", "Paste 3 numbers"), ("1, x, 3", "'x' in the pasted vector"), ("1 nan 2", "NaN"),
                      ("1 2", "has 2 numbers")]:
        with pytest.raises(BadInput, match=msg):
            app_state.parse_vector(text, 3)


# --------------------------------------------------------------------------------------------- views


def test_show_token_and_html_escaping():
    assert show_token("\u0120Einstein") == " Einstein"
    assert show_token("a\nb\x06") == "a⏎b\\x06"
    chips = token_chips([" <script>alert(1)</script>", "x"])
    assert "<script>" not in chips and "␣&lt;script&gt;" in chips
    html = example_html(["<b>", " Einstein", "'"], [0.0, 2.0, 1.0], 1, 2.0)
    assert "&lt;b&gt;" in html and "rgba(255,140,0,1.00)" in html and "outline" in html and "&#x27;" in html
    assert fmt(None) == "—" and fmt(1234) == "1,234" and fmt(-0.000439, 3) == "-4.4e-04"


def test_paper_notes_and_counts_read_old_and_new_manifests(atlas, old_manifest_atlas):
    notes = paper_notes(atlas)
    assert set(notes) == {"novel", "meta", "meta_siblings", "overlap"}  # synthetic paths fall smoothly: no "paths"
    assert notes["meta_siblings"].endswith("(cosine ≥ 0.7) it explains 65%, on rows without one (cosine < 0.5) 22%.")
    old = Atlas.open(old_manifest_atlas)
    person, science = showcase(atlas), showcase(atlas, "science")
    assert showcase(old) is None and person is not None and person.latent == 7
    assert science is not None and (science.width, science.latent) == (64, 2)
    assert latent_counts(old).equals(latent_counts(atlas).assign(
        always_on_share=latent_counts(old)["always_on_share"]))
    assert set(paper_notes(old)) == {"paths"}  # no functional fraction: the cosine proxy is near 35%
    # a path climbing above both its ends is said so, with the factor
    bumpy = {(1, 2): pd.DataFrame({"mse": [10.0, 30.0, 8.0, 9.0]})}
    assert path_shape(bumpy) == {"monotone_frac": pytest.approx(1 / 3), "peak_over_ends": pytest.approx(3.0)}
    assert [badge(0.0), badge(0.3), badge(0.05), badge(0.05, DEAD_LABEL)] == [
        "dead", "dense", "", "dead"]


def test_background_loading_progress_and_warm_start(atlas, monkeypatch):
    """Issue 11.5: real progress while the backend loads; the app starts a local backend for a real atlas."""
    health = {"status": "loading", "loading": ["model"],
              "loaded": {"model": False, "meta_sae": True, "saes": [64, 128]}}
    frac, text = load_progress(health, [64, 128, 256])
    assert frac == pytest.approx(3 / 5)
    assert text.startswith("Loading in the background 3/5: now model (ready: meta-SAE, SAE 64, SAE 128)")
    assert load_progress({**health, "loaded": {"model": True}}, [64]) is None
    assert load_progress({"status": "ready"}, [64]) is None  # a backend that does not report loading
    assert not warm_backend(atlas, env={})  # synthetic: no model to load
    import threading

    called = threading.Event()
    monkeypatch.setattr("metasae.app_state.get_backend", lambda path, preload=False: preload and called.set())
    real = type("A", (), {"manifest": atlas.manifest.model_copy(update={"synthetic": False}), "path": atlas.path})()
    assert not warm_backend(real, env={"METASAE_BACKEND_URL": "http://gpu:8000"})
    assert not warm_backend(real, env={"METASAE_WARM_BACKEND": "0"})
    assert warm_backend(real, env={}) and called.wait(5)  # started, asked to preload
    assert "METASAE_PRELOAD" not in os.environ  # only that backend preloads, not every later one


def test_table_downloads_and_missing_values():
    df = pd.DataFrame({"latent": [1, 2], "label": ["a", None], "delta_ce": [0.5, np.nan]})
    assert to_csv(df).decode().splitlines() == ["latent,label,delta_ce", "1,a,0.5", "2,,"]
    import io

    back = pd.read_parquet(io.BytesIO(to_parquet(df)))
    assert back["latent"].tolist() == [1, 2] and back["label"].iloc[0] == "a" and back["label"].isna().iloc[1]
    html = styled(df, {"delta_ce": {"type_config": {"format": "%.3f"}}}).to_html()
    assert "0.500" in html and html.count(MISSING) == 2 and "None" not in html and "nan" not in html


def test_overview_data(atlas):
    ladder = ladder_table(atlas)
    assert list(ladder.columns) == ["width", "latents", "l0", "mse", "fvu", "ce_loss", "ce_delta"]
    assert list(ladder["latents"]) == [64, 128, 256]
    pairs = pair_summaries(atlas)
    assert list(pairs["pair"]) == ["64→128", "128→256"] and pairs["novel_frac"].between(0, 1).all()
    cos = max_cos(atlas)
    assert sorted(cos) == [128, 256] and len(cos[128]) == 128
    found = findings(atlas)
    assert found["meta_var_explained"] == pytest.approx(0.48) and found["threshold"] == 0.7
    assert set(curves(atlas)) == {(64, 128), (128, 256)}


def test_latent_view_and_radial_graph(atlas):
    e = PLANTED["einstein"]
    v = latent_view(atlas, e["width"], e["latent"])
    assert v.label == "Albert Einstein physicist" and list(v.decomposition["meta_latent"]) == [3, 11, 5, 20]
    assert v.family["smaller"]["latent"] == 2 and len(v.examples) == 5
    g = radial_graph(atlas, 128, 7, n_meta=4, n_each=3)
    n = g.nodes
    assert n.loc[0, "kind"] == "center" and list(n[n.kind == "meta"]["meta_latent"]) == [3, 11, 5, 20]
    others = n[n.kind == "latent"]
    assert 0 < len(others) <= 12 and not ((others.sae_width == 128) & (others.latent == 7)).any()
    assert not others.duplicated(["sae_width", "latent"]).any()
    # every member node hangs off at least one meta node, and edges only join existing nodes
    meta_ids = set(n[n.kind == "meta"].index)
    assert all(any(a == n.at[i, "parent"] and b == i and p for a, b, _, p in g.edges) for i in others.index)
    assert all(a in meta_ids or a == 0 for a, _, _, _ in g.edges)
    assert sum(len(g.children(m)) for m in meta_ids) == len(others)
    assert node_params(n.loc[1]) == ("meta_latent", {"meta": "3"})
    assert node_params(others.iloc[0])[0] == "latent"
    # Curie (256/42) shares meta-latents 3 and 11 with Einstein: one node, two edges
    curie = n[(n.sae_width == 256) & (n.latent == 42)]
    if len(curie):
        assert sum(b == curie.index[0] for _, b, _, _ in g.edges) >= 2


def test_radial_graph_shows_live_latents_before_dead_ones(atlas, monkeypatch):
    real = atlas.members

    def members_with_dead_on_top(m, width=None):
        df = real(m, width)
        df.loc[df.index[:3], "label"] = DEAD_LABEL  # the three strongest members never fired
        return df

    monkeypatch.setattr(atlas, "members", members_with_dead_on_top)
    g = radial_graph(atlas, 128, 7, n_meta=1, n_each=3)
    shown = g.nodes[g.nodes.kind == "latent"]
    live = [r for r in members_with_dead_on_top(3).itertuples() if r.label != DEAD_LABEL
            and (r.sae_width, r.latent) != (128, 7)][:3]
    assert len(shown) == 3 and DEAD_LABEL not in set(shown["label"])
    assert list(zip(shown.sae_width, shown.latent, strict=True)) == [(r.sae_width, r.latent) for r in live]


def test_meta_view(atlas):
    mv = meta_view(atlas, 3)
    assert mv.label == "science" and list(mv.per_width["sae_width"]) == [64, 128, 256]
    assert int(mv.per_width["members"].sum()) == len(mv.members)
    assert 3 not in set(mv.cooccurring["meta_latent"])
    assert meta_options(atlas)[3] == (3, "3 · science")


def test_search_views(index):
    res = text_search(index, "einstein")
    assert res.results.iloc[0][["sae_width", "latent"]].tolist() == [128, 7] and res.message is None
    assert "Type a word" in text_search(index, "   ").message
    for hostile in ["'; DROP TABLE latents; --", "\ud800", "日本語", "a" * 10_000, "((((", "\\"]:
        out = text_search(index, hostile)
        assert out.results.empty and ("No latent matches" in out.message or "Type a word" in out.message)
    with pytest.raises(BadInput, match="minimum density"):
        text_search(index, "x", min_density=1.0, max_density=0.1)
    res = meta_search(index, [3, 11], 0.2)
    assert res.results[["sae_width", "latent"]].values.tolist()[:2] == [[128, 7], [256, 42]]
    with pytest.raises(BadInput, match="meta-latent 99"):
        meta_search(index, [99])


def test_stitching_views(atlas):
    t = stitching_table(atlas, 64, 128)
    assert len(t) == 128 and set(t["kind"]) == {"novel", "reconstruction"}
    assert stitching_table(atlas, 64, 128, "novel")["kind"].eq("novel").all()
    with pytest.raises(BadInput, match="neighbouring"):
        stitching_table(atlas, 64, 256)
    s = pair_summary(atlas, 64, 128)
    assert 0 < s["novel_frac"] < 1 and s["n_add"] + s["n_swap"] == len(atlas.stitching_curve(64, 128)) - 1
    assert -1 <= s["attr_spearman"] <= 1
    g = atlas.latents_table(128, ["latent", "group_id"])
    assert 7 in set(g.loc[g["group_id"] == 2, "latent"])


def test_live_views(atlas):
    meta = load_meta_sae(atlas)
    dec = {128: load_decoder(atlas, 128), 64: load_decoder(atlas, 64)}
    assert dec[128].shape == (128, 32)
    v = compose([Term(1.0, 128, 7), Term(-0.5, 64, 2)], dec)
    assert np.allclose(v, dec[128][7] - 0.5 * dec[64][2])
    live = encode_live(atlas, meta, dec[128][7])
    assert list(live.columns) == ["meta_latent", "weight", "label"] and (live["weight"] > 0).all()
    with pytest.raises(BadInput, match="dimension"):
        encode_live(atlas, meta, np.ones(5))
    exp = expected_decomposition(atlas, [Term(1.0, 128, 7), Term(-0.5, 64, 2)])
    assert dict(zip(exp["meta_latent"], exp["weight"].round(4), strict=True))[3] == pytest.approx(0.2)
    cmp = compare(atlas.decomposition(128, 7), live)
    assert {"meta_latent", "label", "stored", "live", "difference"} <= set(cmp.columns)
    assert np.allclose(cmp["difference"], cmp["live"] - cmp["stored"])


def test_weightless_atlas_says_so(tmp_path):
    from metasae.synthetic_atlas import make_synthetic_atlas

    a = Atlas.open(make_synthetic_atlas(tmp_path / "w", widths=(16, 32), n_meta=8, plant=False,
                                        with_weights=False))
    with pytest.raises(AtlasError, match="without SAE weights"):
        load_meta_sae(a)


def test_activations_table():
    res = {"tokens": ["Al", "bert"], "top": [[{"latent": 3, "activation": 1.5, "label": "x"}],
                                             [{"latent": 4, "activation": 0.5, "label": "y"},
                                              {"latent": 3, "activation": 0.2, "label": "x"}]]}
    t = activations_table(res)
    assert t[["position", "latent", "rank"]].values.tolist() == [[0, 3, 0], [1, 4, 0], [1, 3, 1]]
    assert activations_table({}).empty


def test_get_backend_reports_why(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "metasae.backend.client", None)  # import fails
    backend, why = get_backend()
    assert backend is None and why.startswith("Backend unavailable")


# --------------------------------------------------------------------------------------------- plots


def test_figures(atlas):
    ladder = ladder_table(atlas)
    f = plots.ladder_figure(ladder, curves(atlas))
    assert isinstance(f, go.Figure)
    assert [t.name for t in f.data] == ["stitch 64→128", "SAEs", "stitch 128→256", "SAEs"]
    # one panel per pair; its rungs are labelled on opposite sides, so the labels cannot overlap
    rungs = [t for t in f.data if t.name == "SAEs"]
    assert [list(t.text) for t in rungs] == [["64", "128"], ["128", "256"]]
    assert all(list(t.textposition) == ["middle left", "middle right"] for t in rungs)
    assert f.layout.yaxis.type == "log" and f.layout.xaxis2.anchor == "y2"
    assert [t.name for t in plots.novel_fraction_figure(pair_summaries(atlas)).data] == [
        "cosine proxy, all latents", "cosine proxy, live latents", "functional (insertion lowers MSE)"]
    assert len(plots.max_cos_figure(max_cos(atlas), 0.7).data) == 2
    row = atlas.latent(128, 7)
    h = plots.histogram_figure(row["hist_counts"], row["hist_edges"])
    assert len(h.data[0].x) == len(row["hist_edges"])
    assert plots.histogram_figure(None, None).layout.annotations
    logh = plots.histogram_figure([1, 2, 3], [0.1, 1, 10, 100])
    assert logh.layout.xaxis.type == "log"
    dec = plots.decomposition_figure(atlas.decomposition(128, 7))
    assert list(dec.data[0].x) == pytest.approx([0.05, 0.15, 0.3, 0.5])
    g = radial_graph(atlas, 128, 7)
    rf = plots.radial_figure(g)
    nodes = [t for t in rf.data if t.customdata is not None]
    assert sorted(int(i) for t in nodes for i in t.customdata) == list(g.nodes.index)
    curve = atlas.stitching_curve(64, 128)
    assert {t.name for t in plots.stitch_path_figure(curve, 64, 128).data} >= {"add", "swap"}
    assert len(plots.stitch_ce_figure(curve, 64, 128).data) == 1
    assert plots.stitch_path_figure(curve.iloc[0:0], 64, 128).layout.annotations
    table = stitching_table(atlas, 64, 128)
    assert {t.name for t in plots.delta_scatter(table).data} == {"novel", "reconstruction"}
    mv = meta_view(atlas, 3)
    assert len(plots.members_figure(mv.per_width).data) == 1 and len(plots.cooccur_figure(mv.cooccurring).data) == 1
    cmp = compare(atlas.decomposition(128, 7), atlas.decomposition(256, 42))
    assert len(plots.compare_figure(cmp).data) == 2
    acts = pd.DataFrame({"position": [0, 1, 1], "token": ["a", "b", "b"], "rank": [0, 0, 1],
                         "latent": [3, 4, 3], "activation": [1.0, 0.5, 0.2], "label": ["x", "y", "x"]})
    hm = plots.token_latent_heatmap(acts)
    assert np.asarray(hm.data[0].z).shape == (2, 2)


def test_paths_note_says_how_few_groups_help_alone(atlas, monkeypatch):
    f = {**findings(atlas), "monotone_frac": 0.4, "groups_help_alone": 0.15, "families_help_alone": 0.01}
    monkeypatch.setattr("metasae.views.overview.findings", lambda _atlas: f)
    monkeypatch.setattr("metasae.views.overview.curves", lambda _atlas: {})
    note = paper_notes(atlas)["paths"]
    assert "does not rise on 40% of the steps" in note
    assert "Only 15% of the groups lower MSE when applied alone, and 1% of whole families" in note


def test_fresh_differences_name_another_attribution(synthetic_atlas, tmp_path):
    """A fresh evaluation whose attribution had other exact pairs than the atlas's says so in words."""
    import shutil

    from metasae.atlas import read_manifest, write_manifest
    from metasae.views.stitching import fresh_differences

    out = tmp_path / "atlas"
    shutil.copytree(synthetic_atlas, out)
    m, _ = read_manifest(out)
    m["stitching"]["pairs"][0]["attr_exact_pairs"] = 256
    write_manifest(out, m)
    atlas = Atlas.open(out)
    result = {"n_tokens": 100, "n_ce_tokens": 120, "attr_exact_pairs": 0}
    said = " ".join(fresh_differences(atlas, 64, 128, result, {"n_tokens": 100}))
    assert "the atlas's ΔCE attribution had its 256 largest latent-context terms computed exactly; this " \
           "evaluation's had 0 (a Ray cluster computes first-order attribution only)." in said
    same = " ".join(fresh_differences(atlas, 64, 128, {**result, "attr_exact_pairs": 256}, {"n_tokens": 100}))
    assert "Other attribution" not in same
