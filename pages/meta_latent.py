"""Meta-latent: its label, member latents across widths, histogram, boosted tokens, co-occurring meta-latents."""

import streamlit as st

from metasae import app_state, plots, ui
from metasae.views.badges import with_badges
from metasae.views.meta_latent import meta_options, meta_view
from metasae.views.text import fmt, show_token

ctx, atlas = ui.require_atlas()

try:
    meta = app_state.resolve_meta(atlas, ui.param("meta"))
    url_error = None
except app_state.BadInput as e:
    meta, url_error = app_state.resolve_meta(atlas, None), str(e)

st.title(f"Meta-latent {meta}" if not url_error else "Meta-latent")
options = meta_options(atlas)
names = dict(options)
ui.bind("pick_meta", meta)
st.selectbox("Meta-latent", [m for m, _ in options], key="pick_meta", format_func=lambda m: names.get(m, str(m)),
             on_change=ui.to_url("pick_meta", "meta", encode=int))
if url_error:
    st.error(url_error)
    st.stop()

view = meta_view(atlas, meta)
st.markdown(f"### {view.label or '(no label)'}")
m = st.columns(4)
m[0].metric("Member latents", fmt(len(view.members)), help="latents of any width whose decomposition holds it")
m[1].metric("Density", fmt(view.row.get("density"), 3), help="fraction of all latents that hold it")
m[2].metric("Mean member weight", fmt(float(view.members["weight"].mean()) if len(view.members) else None, 3))
m[3].metric("Widths with members", f"{int((view.per_width['members'] > 0).sum())} / {len(atlas.widths)}")

left, right = st.columns(2)
with left, ui.guard():
    st.plotly_chart(plots.members_figure(view.per_width), key="members")
    st.plotly_chart(plots.histogram_figure(view.row.get("hist_counts"), view.row.get("hist_edges"),
                                           "Meta-latent activation histogram (over decoder rows)"), key="mhist")
with right, ui.guard():
    st.markdown("**Top boosted tokens**")
    ui.chips(view.row.get("top_logits"))
    st.markdown("**Top tokens of its members**")
    ui.chips(view.row.get("top_tokens"))
    if view.cooccurring.empty:
        st.caption("No other meta-latent shares a latent with this one.")
    else:
        st.plotly_chart(plots.cooccur_figure(view.cooccurring), key="cooc")
        for r in view.cooccurring.head(5).itertuples(index=False):
            ui.meta_link(r.meta_latent, r.label, extra=f"  ({r.count} shared)")

st.subheader("Nearest latents in every width (decoder cosine, members or not)")
with ui.guard():  # issue 12.3: the meta-latent's direction against every decoder row of the ladder
    from metasae import family

    if not atlas.manifest.weights:
        st.caption("This atlas has no SAE weights: the decoder cosines cannot be computed.")
    else:
        near, best = family.meta_family(atlas, meta, k=5)
        if best:
            st.markdown(f"Best matched at **width {best['sae_width']}**: latent {best['latent']} "
                        f"(cos {best['cos']:.3f}).")
        n1, n2 = st.columns([1, 2])
        n1.plotly_chart(family.per_width_figure(near), key="near_per_width")
        with n2:
            ui.table(ui.with_links(with_badges(near.assign(label=near["label"].map(show_token)))),
                     f"meta_{meta}_nearest", column_config={
                         **ui.LINK_COLUMN, "cos": st.column_config.NumberColumn("cos", format="%.3f")})

st.subheader("Member latents, strongest first")
with ui.guard():
    ui.bind("meta_widths", [w for w in app_state.parse_int_list(ui.param("mw"), "Width") if w in atlas.widths])
    widths = st.multiselect("Widths", atlas.widths, key="meta_widths", placeholder="all widths",
                            on_change=ui.to_url("meta_widths", "mw", encode=lambda v: ",".join(map(str, v)),
                                                default=[]))
    members = view.members if not widths else view.members[view.members["sae_width"].isin(widths)]
    for r in members.head(8).itertuples(index=False):
        ui.latent_link(r.sae_width, r.latent, r.label, extra=f"  (weight {r.weight:.3f})")
    table = ui.with_links(with_badges(members.head(2000).assign(
        label=members.head(2000)["label"].map(show_token))))
    ui.table(table, f"meta_{meta}_members", column_config={
        **ui.LINK_COLUMN, "weight": st.column_config.NumberColumn("weight", format="%.4f")})
    if len(members) > 2000:
        st.caption(f"Showing the strongest 2,000 of {len(members):,} members.")
