"""Live: encode a decoder row, a composed direction or a pasted vector with the meta-SAE now; see which latents
fire on typed text (through the backend, which runs the language model)."""

import numpy as np
import streamlit as st

from metasae import app_state, plots, ui
from metasae.views.badges import DENSE
from metasae.views.live import (
    LIVE_TOP_K,
    activations_table,
    compare,
    compose,
    encode_live,
    expected_decomposition,
    latent_over_text,
    live_top,
    load_progress,
)
from metasae.views.render import example_html
from metasae.views.text import show_token

ctx, atlas = ui.require_atlas()
st.title("Live")

st.header("Meta-SAE, computed now")
SOURCES = {"row": "A latent's decoder row", "expr": "A composed direction", "vector": "A pasted vector"}
src = ui.param("src") if ui.param("src") in SOURCES else "row"
ui.bind("lv_src", src)
st.segmented_control("Encode", list(SOURCES), key="lv_src", format_func=SOURCES.get, required=True,
                     on_change=ui.to_url("lv_src", "src", default="row"))

with ui.guard():
    d_model = atlas.manifest.model.d_model
    stored = None
    if src == "row":
        width, latent, bad = ui.latent_picker(atlas, "lv")
        if bad:
            raise app_state.BadInput(bad)
        ui.latent_link(width, latent, atlas.latent(width, latent)["label"])
        vector = ui.decoder(ui.atlas_key(ctx), width, atlas)[latent]
        stored, stored_name = atlas.decomposition(width, latent), "stored in the atlas"
    elif src == "expr":
        expr = ui.param("expr") or ""
        ui.bind("lv_expr", expr[:400])
        st.text_input("Direction: width:latent terms joined by + and − (coefficients allowed: 0.5*128:7)",
                      key="lv_expr", placeholder=f"{atlas.widths[-1]}:1 - {atlas.widths[-1]}:2 + {atlas.widths[0]}:3",
                      on_change=ui.to_url("lv_expr", "expr", default=""))
        terms = app_state.parse_direction(expr, atlas)
        decs = {w: ui.decoder(ui.atlas_key(ctx), w, atlas) for w in {t.width for t in terms}}
        vector = compose(terms, decs)
        stored, stored_name = expected_decomposition(atlas, terms), "sum of the terms' stored decompositions"
    else:
        vec_text = ui.param("vec") or ""
        ui.bind("lv_vec", vec_text)
        st.text_area(f"Vector ({d_model or 'd_model'} numbers)", key="lv_vec", height=100,
                     on_change=ui.to_url("lv_vec", "vec", default=""))
        vector = np.asarray(app_state.parse_vector(vec_text, d_model), dtype=np.float32)

    live = encode_live(atlas, ui.meta_sae(ui.atlas_key(ctx), atlas), vector)
    st.caption(f"‖vector‖ = {float(np.linalg.norm(vector)):.4g} · the meta-SAE gives {len(live)} meta-latents")
    if stored is not None:
        if atlas.manifest.synthetic:
            st.info("A synthetic atlas: its stored decompositions were planted, not computed by its (random) "
                    "meta-SAE, so the two disagree here. On a built atlas they agree up to float precision.")
        cmp = compare(stored, live)
        st.plotly_chart(plots.compare_figure(cmp, stored_name, "computed now"), key="cmp")
        ui.table(cmp, "live_meta_compare", column_config={
            c: st.column_config.NumberColumn(c, format="%.4f") for c in ("stored", "live", "difference")})
    else:
        st.plotly_chart(plots.decomposition_figure(live, "Meta-latents of the pasted vector"), key="livedec")
    for r in live.head(6).itertuples(index=False):
        ui.meta_link(r.meta_latent, r.label, extra=f"  ({r.weight:.3f})")

st.header("Text → latents, per token")
st.caption("Runs the language model and one SAE of the ladder on your text, through the metasae backend.")
LIMIT = app_state.MAX_TEXT_CHARS
text, cut_note = app_state.cut_text(ui.param("text"), LIMIT)
try:
    twidth = app_state.parse_int(ui.param("tw"), "Width")
    twidth = atlas.widths[0] if twidth is None else app_state.check_width(atlas, twidth)
except app_state.BadInput as e:
    st.error(str(e))
    twidth = atlas.widths[0]
c1, c2 = st.columns([4, 1])
ui.bind("lv_text", text)
# no max_chars: a browser refuses a paste longer than the box allows and leaves it empty; the text is cut here,
# and the page says so
c1.text_area(f"Text (up to {LIMIT:,} characters)", key="lv_text", height=90,
             placeholder="Albert Einstein was a German-born theoretical physicist.",
             on_change=ui.to_url("lv_text", "text", default=""))
if cut_note:
    st.warning(cut_note)
ui.bind("lv_tw", twidth)
c2.selectbox("SAE width", atlas.widths, key="lv_tw", on_change=ui.to_url("lv_tw", "tw", default=atlas.widths[0]))

MODES = {"top": "Top latents per token", "one": "One latent over the text"}
tmode = ui.param("tmode") if ui.param("tmode") in MODES else "top"
f1, f2, f3 = st.columns([3, 2, 2])  # the mode buttons need room for their labels
ui.bind("lv_tmode", tmode)
f1.segmented_control("Show", list(MODES), key="lv_tmode", format_func=MODES.get, required=True,
                     on_change=ui.to_url("lv_tmode", "tmode", default="top"))
try:
    dense_max = app_state.parse_float(ui.param("dmax"), "Dense threshold")
    dense_max = DENSE if dense_max is None else min(max(dense_max, 0.0), 1.0)
except app_state.BadInput as e:
    st.error(str(e))
    dense_max = DENSE
show_dense, show_first = ui.param("dense") == "1", ui.param("first") == "1"
if tmode == "top":
    ui.bind("lv_hide_dense", not show_dense)
    f2.toggle("Hide dense latents", key="lv_hide_dense", help="latents that fire on more tokens than the threshold "
              "(always-on latents crowd every token's top 5)",
              on_change=ui.to_url("lv_hide_dense", "dense", encode=lambda v: "0" if v else "1", default=True))
    ui.bind("lv_hide_first", not show_first)
    f2.toggle("Hide the first token", key="lv_hide_first", help="the model parks attention on it; thousands of "
              "latents fire there", on_change=ui.to_url("lv_hide_first", "first", encode=lambda v: "0" if v else "1",
                                                        default=True))
    ui.bind("lv_dmax", float(dense_max))
    f3.number_input("Dense: density above", min_value=0.0, max_value=1.0, step=0.05, key="lv_dmax",
                    disabled=show_dense, on_change=ui.to_url("lv_dmax", "dmax", encode=lambda v: f"{v:g}",
                                                            default=DENSE))
else:
    try:
        one = app_state.parse_int(ui.param("tl"), "Latent")
        one = 0 if one is None else app_state.resolve_latent(atlas, str(twidth), str(one))[1]
    except app_state.BadInput as e:
        st.error(str(e))
        one = 0
    ui.bind("lv_one", one)
    f2.number_input(f"Latent of width {twidth}", min_value=0, max_value=atlas.n_latents(int(twidth)) - 1, step=1,
                    key="lv_one", on_change=ui.to_url("lv_one", "tl", encode=int))
    with f3:
        ui.latent_link(int(twidth), one, atlas.latent(int(twidth), one)["label"])

@st.fragment(run_every=1.5)
def loading(backend) -> None:
    """Real progress while the backend loads; one full rerun once the model is in."""
    try:
        progress = load_progress(backend.health(), atlas.widths)
    except Exception as e:  # it died meanwhile: the next run says so
        ui.show_error(e)
        return
    if progress is None:
        st.rerun(scope="app")
    st.progress(progress[0], text=progress[1])


if text.strip():
    backend, why = ui.backend(ctx)
    if backend is None:
        st.warning(why)
    elif load_progress(backend.health(), atlas.widths) is not None:
        loading(backend)
    else:
        with ui.guard():
            result = ui.activations(ui.atlas_key(ctx), text, int(twidth), LIVE_TOP_K, backend)
            if tmode == "top":
                acts = activations_table(result, ui.densities(ui.atlas_key(ctx), int(twidth), atlas))
                shown = live_top(acts, None if show_dense else dense_max, not show_first)
                if shown.hidden:
                    st.caption(shown.hidden + " Use the toggles above to show them.")
                st.plotly_chart(plots.token_latent_heatmap(shown.table), key="heat")
                ui.table(ui.with_links(shown.table.assign(sae_width=int(twidth))).drop(columns=["sae_width"]),
                         "live_tokens", column_config=ui.LINK_COLUMN)
            else:
                over = latent_over_text(result, one)
                peak = float(over["activation"].max()) if len(over) else 0.0
                n_on = int((over["activation"] > 0).sum())
                st.markdown(f"Latent **{twidth}/{one}** fires on **{n_on}** of {len(over)} tokens"
                            + (f" (peak {peak:.3g})." if n_on else "."))
                st.markdown(example_html(list(over["token"]), list(over["activation"]), None, peak or None),
                            unsafe_allow_html=True)
                st.caption(f"Activations among each token's {LIVE_TOP_K} strongest latents (all of them for "
                           f"an SAE with fewer than {LIVE_TOP_K} active per token).")
                ui.table(over.assign(token=over["token"].map(show_token)), "latent_over_text")
else:
    st.info("Type some text to see the top latents of each token.")
