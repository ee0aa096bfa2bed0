"""Overview: what the atlas holds and the paper's two findings, told with this atlas's numbers."""

import streamlit as st

from metasae import plots, ui, views

ctx, atlas = ui.require_atlas()
facts = views.overview_facts(atlas)
found = views.findings(atlas)

st.title("Are SAE latents canonical units?")
st.caption(f"Atlas `{ctx.source.title if ctx.source else atlas.path}` · {atlas.path}")
if facts["synthetic"]:
    st.info("This is a synthetic atlas (generated for tests and benchmarks): labels and numbers are made up.")

st.markdown(
    f"Model **{facts['model'] or '?'}**" + (f" (`{facts['model_source']}`)" if facts["model_source"] else "")
    + f" · hook `{facts['hook'] or '?'}` · d_model {facts['d_model'] or '?'} · corpus: {facts['corpus'] or '?'}")
cols = st.columns(5)
cols[0].metric("Corpus tokens", views.fmt(facts["n_tokens"]))
cols[1].metric("SAE widths", len(facts["widths"]), help=", ".join(map(str, facts["widths"])))
cols[2].metric("Latents", views.fmt(facts["n_latents"]), help="over all widths")
cols[3].metric("Meta-latents", views.fmt(facts["meta_width"]), help=f"k = {facts['meta_k']}")
cols[4].metric("Meta-SAE explains",
               "—" if found["meta_var_explained"] is None else f"{found['meta_var_explained']:.0%}",
               help="variance of the decoder rows the meta-SAE explains, 1 − FVU (paper: about half)")

left, right = st.columns(2)
with left, st.container(border=True):
    st.subheader("1 · Bigger SAEs do not just refine smaller ones")
    nf = found["novel_frac_mean"]
    st.markdown(
        f"Each larger SAE of the ladder holds **novel** latents — no latent of the next smaller SAE points the "
        f"same way (max decoder cosine < {found['threshold']:g}) — "
        + (f"**{nf:.0%}** of them on average here" if nf is not None else "")
        + " (the paper finds ~35% on GPT-2). The rest are **reconstruction** latents that re-cut old ones. "
          "Adding the novel latents and swapping the groups one at a time walks from the small SAE to the large "
          "one (the paths on the MSE-vs-L0 plane below; in the paper they are smooth, so the SAEs met on the way "
          "are as good as the rungs): there is no single right width, so no canonical set of units.")
    ui.page_link("stitching", "Explore a stitching pair", icon=":material/call_merge:")
with right, st.container(border=True):
    st.subheader("2 · Latents are not atomic")
    ve, terms = found["meta_var_explained"], found["meta_terms"]
    st.markdown(
        f"A meta-SAE with {views.fmt(found['meta_width'])} meta-latents (k = {found['meta_k']}) is trained on "
        f"the decoder rows of the SAEs. "
        + (f"It explains **{ve:.0%}** of their variance" if ve is not None else "It explains much of their variance")
        + (f" with about {terms:.1f} meta-latents per latent" if terms else "")
        + ": each latent is a composition of more basic directions (the paper's Einstein latent = science + "
          "prominent figures + German + …). "
        + (f"Sharing a meta-latent agrees with sharing a stitching group for {found['meta_overlap']:.1%} of pairs."
           if found["meta_overlap"] is not None else ""))
    ui.page_link("latent", "Open a latent and its decomposition", icon=":material/scatter_plot:")

st.subheader("The ladder")
with ui.guard():
    ladder = views.ladder_table(atlas)
    st.dataframe(ladder, hide_index=True, column_config={
        "width": st.column_config.NumberColumn("width", format="%d"),
        "latents": st.column_config.NumberColumn("latents", format="%d"),
        "l0": st.column_config.NumberColumn("L0", format="%.2f"),
        "mse": st.column_config.NumberColumn("MSE", format="%.4g"),
        "fvu": st.column_config.NumberColumn("FVU", format="%.4f"),
        "ce_loss": st.column_config.NumberColumn("CE loss", format="%.4f"),
        "ce_delta": st.column_config.NumberColumn("ΔCE", format="%.4g",
                                                  help="CE loss with the SAE spliced in minus the clean loss"),
    })
    st.plotly_chart(plots.ladder_figure(ladder, views.curves(atlas)), key="ladder")

c1, c2 = st.columns(2)
with c1, ui.guard():
    st.plotly_chart(plots.novel_fraction_figure(views.pair_summaries(atlas)), key="novel")
with c2, ui.guard():
    st.plotly_chart(plots.max_cos_figure(views.max_cos(atlas), float(found["threshold"] or 0.7)), key="maxcos")
