"""Live: encode a decoder row, a composed direction or a pasted vector with the meta-SAE now; see which latents
fire on typed text (through the backend, which runs the language model)."""

import numpy as np
import streamlit as st

from metasae import app_state, plots, ui, views

ctx, atlas = ui.require_atlas()
st.title("Live")

st.header("Meta-SAE, computed now")
SOURCES = {"row": "A latent's decoder row", "expr": "A composed direction", "vector": "A pasted vector"}
src = ui.param("src") if ui.param("src") in SOURCES else "row"
ui.bind("lv_src", src)
st.segmented_control("Encode", list(SOURCES), key="lv_src", format_func=SOURCES.get, required=True,
                     on_change=ui.to_url("lv_src", "src", default="row"))

with ui.guard():
    d_model = (atlas.manifest.get("model") or {}).get("d_model")
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
        vector = views.compose(terms, decs)
        stored, stored_name = views.expected_decomposition(atlas, terms), "sum of the terms' stored decompositions"
    else:
        vec_text = ui.param("vec") or ""
        ui.bind("lv_vec", vec_text)
        st.text_area(f"Vector ({d_model or 'd_model'} numbers)", key="lv_vec", height=100,
                     on_change=ui.to_url("lv_vec", "vec", default=""))
        vector = np.asarray(app_state.parse_vector(vec_text, d_model), dtype=np.float32)

    live = views.encode_live(atlas, ui.meta_sae(ui.atlas_key(ctx), atlas), vector)
    st.caption(f"‖vector‖ = {float(np.linalg.norm(vector)):.4g} · the meta-SAE gives {len(live)} meta-latents")
    if stored is not None:
        if atlas.manifest.get("synthetic"):
            st.info("A synthetic atlas: its stored decompositions were planted, not computed by its (random) "
                    "meta-SAE, so the two disagree here. On a built atlas they agree up to float precision.")
        cmp = views.compare(stored, live)
        st.plotly_chart(plots.compare_figure(cmp, stored_name, "computed now"), key="cmp")
        st.dataframe(cmp, hide_index=True, column_config={
            c: st.column_config.NumberColumn(c, format="%.4f") for c in ("stored", "live", "difference")})
    else:
        st.plotly_chart(plots.decomposition_figure(live, "Meta-latents of the pasted vector"), key="livedec")
    for r in live.head(6).itertuples(index=False):
        ui.meta_link(r.meta_latent, r.label, extra=f"  ({r.weight:.3f})")

st.header("Text → latents, per token")
st.caption("Runs the language model and one SAE of the ladder on your text, through the metasae backend.")
text = (ui.param("text") or "")[: app_state.MAX_TEXT_CHARS]
try:
    twidth = app_state.parse_int(ui.param("tw"), "Width")
    twidth = atlas.widths[0] if twidth is None else app_state.check_width(atlas, twidth)
except app_state.BadInput as e:
    st.error(str(e))
    twidth = atlas.widths[0]
c1, c2 = st.columns([4, 1])
ui.bind("lv_text", text)
c1.text_area("Text", key="lv_text", height=90, max_chars=app_state.MAX_TEXT_CHARS,
             placeholder="Albert Einstein was a German-born theoretical physicist.",
             on_change=ui.to_url("lv_text", "text", default=""))
ui.bind("lv_tw", twidth)
c2.selectbox("SAE width", atlas.widths, key="lv_tw", on_change=ui.to_url("lv_tw", "tw", default=atlas.widths[0]))
if text.strip():
    backend, why = ui.backend(ctx)
    if backend is None:
        st.warning(why)
    else:
        with ui.guard():
            result = ui.activations(ui.atlas_key(ctx), text, int(twidth), 5, backend)
            acts = views.activations_table(result)
            st.plotly_chart(plots.token_latent_heatmap(acts), key="heat")
            st.dataframe(ui.with_links(acts.assign(sae_width=int(twidth))).drop(columns=["sae_width"]),
                         hide_index=True, column_config=ui.LINK_COLUMN)
else:
    st.info("Type some text to see the top latents of each token.")
