"""Overview: what the atlas holds and the paper's two findings, told with this atlas's numbers."""

import streamlit as st

from metasae import plots, ui
from metasae.views.badges import DENSE, RARE
from metasae.views.overview import (
    curves,
    findings,
    ladder_table,
    latent_counts,
    max_cos,
    overview_facts,
    pair_summaries,
    paper_notes,
    showcase,
)
from metasae.views.text import fmt, latent_name, number

ctx, atlas = ui.require_atlas()
facts = overview_facts(atlas)
found = findings(atlas)

st.title("Are SAE latents canonical units?")
st.caption(f"Atlas `{ctx.source.title if ctx.source else atlas.path}` · {atlas.path}")
if facts["synthetic"]:
    st.info("This is a synthetic atlas (generated for tests and benchmarks): labels and numbers are made up.")

st.markdown(
    f"Model **{facts['model'] or '?'}**" + (f" (`{facts['model_source']}`)" if facts["model_source"] else "")
    + f" · hook `{facts['hook'] or '?'}` · d_model {facts['d_model'] or '?'} · corpus: {facts['corpus'] or '?'}")
cols = st.columns(5)
cols[0].metric("Corpus tokens", fmt(facts["n_tokens"]))
cols[1].metric("SAE widths", len(facts["widths"]), help=", ".join(map(str, facts["widths"])))
cols[2].metric("Latents", fmt(facts["n_latents"]), help="over all widths")
cols[3].metric("Meta-latents", fmt(facts["meta_width"]), help=f"k = {facts['meta_k']}")
explained = found["meta_heldout_explained"] if found["meta_heldout_explained"] is not None else found["meta_var_explained"]
cols[4].metric("Meta-SAE explains", "—" if explained is None else f"{explained:.0%}",
               help=("variance of held-out decoder rows" if found["meta_heldout_explained"] is not None else
                     "variance of the decoder rows") + " the meta-SAE explains, 1 − FVU (paper: about half)")

notes = paper_notes(atlas)
example = showcase(atlas, "person") or showcase(atlas)


def note(key: str) -> None:
    """The plain sentence saying how this atlas differs from the paper on one number (when it does)."""
    if notes.get(key):
        st.caption(notes[key])


left, right = st.columns(2)
with left, st.container(border=True):
    st.subheader("1 · Bigger SAEs do not just refine smaller ones")
    nf, func, live = found["novel_frac_mean"], found["novel_functional"], found["novel_cos_live"]
    base = found["seed_baseline"]
    if func is not None:
        head = (f"**{func:.0%}** of the live latents on average here are novel by the paper's test — inserting one "
                "into the next smaller SAE lowers its MSE"
                + (f" (cosine proxy: {live:.0%} of live latents have no smaller latent within max decoder cosine "
                   f"{found['threshold']:g})" if live is not None else ""))
    else:
        head = ("novel latents — no latent of the next smaller SAE points the same way (max decoder cosine < "
                f"{found['threshold']:g})" + (f": **{nf:.0%}** of them on average here" if nf is not None else ""))
    st.markdown(
        f"Each larger SAE of the ladder holds **novel** latents: {head}. "
        + (f"Same-width baseline: two seeds of width {base.width} leave "
           f"**{base.mismatch_frac:.0%}** of live latents unmatched. "
           if base is not None and number(base.mismatch_frac) is not None else "")
        + "The rest are **reconstruction** latents that re-cut old ones. Adding the novel latents and swapping the "
          "groups one at a time walks from the small SAE to the large one (the paths on the MSE-vs-L0 plane "
          "below): there is no single right width, so no canonical set of units.")
    note("novel")
    note("paths")
    ui.page_link("stitching", "Explore a stitching pair", icon=":material/call_merge:")
with right, st.container(border=True):
    st.subheader("2 · Latents are not atomic")
    ve, terms = found["meta_var_explained"], found["meta_terms"]
    held = found["meta_heldout_explained"]
    st.markdown(
        f"A meta-SAE with {fmt(found['meta_width'])} meta-latents (k = {found['meta_k']}) is trained on "
        f"the decoder rows of the SAEs. "
        + (f"It explains **{held:.0%}** of the variance of held-out rows"
           + (f" ({found['meta_train_explained']:.0%} of its training rows)"
              if found["meta_train_explained"] is not None else "")
           if held is not None else
           f"It explains **{ve:.0%}** of their variance" if ve is not None else "It explains much of their variance")
        + (f" with about {terms:.1f} meta-latents per latent" if terms else "")
        + ": each latent is a composition of more basic directions (the paper's Einstein latent = science + "
          "prominent figures + German + …)."
        + (f" Trained twice with other seeds, {found['meta_seed_stability']:.0%} of its meta-latents recur."
           if found["meta_seed_stability"] is not None else "")
        + (f" Sharing a meta-latent agrees with sharing a stitching group for {found['meta_overlap']:.1%} of pairs."
           if found["meta_overlap"] is not None else ""))
    note("meta")
    note("meta_siblings")
    note("overlap")
    if example:
        ui.page_link("latent", f"Open {latent_name(example.width, example.latent, example.label)}"
                     " and its decomposition", {"width": example.width, "latent": example.latent},
                     icon=":material/scatter_plot:", help=example.why)

st.subheader("The ladder")
with ui.guard():
    ladder = ladder_table(atlas)
    ui.table(ladder, "ladder", column_config={
        "width": st.column_config.NumberColumn("width", format="%d"),
        "latents": st.column_config.NumberColumn("latents", format="%d"),
        "l0": st.column_config.NumberColumn("L0", format="%.2f"),
        "mse": st.column_config.NumberColumn("MSE", format="%.4g"),
        "fvu": st.column_config.NumberColumn("FVU", format="%.4f"),
        "ce_loss": st.column_config.NumberColumn("CE loss", format="%.4f"),
        "ce_delta": st.column_config.NumberColumn("ΔCE", format="%.4g",
                                                  help="CE loss with the SAE spliced in minus the clean loss"),
    })
    st.plotly_chart(plots.ladder_figure(ladder, curves(atlas)), key="ladder")

st.subheader("Convergence")
with ui.guard():
    training = atlas.training_curves()
    if training.empty:
        st.info(atlas.missing_table_message("training_curves"))
    else:
        st.caption("Each rung's FVU on its training batches as training went on: a curve still falling at its end "
                   "means the rung had not converged, and its latents (and the novel fractions built on them) "
                   "would still move. The same-width seed baseline on this page is the other half of that check.")
        st.plotly_chart(plots.training_curves_figure(training), key="training")

st.subheader("Dead, rare and dense latents")
with ui.guard():
    st.caption(f"Dead: never fired on the statistics tokens · rare: density below {RARE:g} · dense: density "
               f"above {DENSE:g} · always-on share: the share of active slots taken by latents firing on more "
               "than half of all tokens. Pages mark dead and dense latents with a badge.")
    ui.table(latent_counts(atlas), "latent_counts", column_config={
        "width": st.column_config.NumberColumn("width", format="%d"),
        "always_on_share": st.column_config.NumberColumn("always-on share", format="%.3f")})

c1, c2 = st.columns(2)
with c1, ui.guard():
    st.plotly_chart(plots.novel_fraction_figure(pair_summaries(atlas),
                                                seed_mismatch=number(found["seed_baseline"].mismatch_frac
                                                                         if found["seed_baseline"] else None)),
                    key="novel")
with c2, ui.guard():
    st.plotly_chart(plots.max_cos_figure(max_cos(atlas), float(found["threshold"])), key="maxcos")
