"""Latent: one latent of one width — statistics, examples, meta-decomposition, radial graph and family."""

import pandas as pd
import streamlit as st

from metasae import plots, ui
from metasae.views.badges import DENSE, badge, with_badges
from metasae.views.latent import effects, latent_view, node_params, radial_graph
from metasae.views.render import example_html
from metasae.views.text import fmt, show_token

ctx, atlas = ui.require_atlas()

head = st.container()  # the title goes above the pickers, which decide it
width, latent, url_error = ui.latent_picker(atlas, "pick")
head.title(f"Latent {width}/{latent}" if not url_error else "Latent")

if url_error:
    st.error(url_error)
    st.stop()

view = latent_view(atlas, width, latent)
row = view.row
st.markdown(f"### {view.label or '(no label)'}")
kind = row.get("kind")
if kind:
    st.badge(kind, color="orange" if kind == "novel" else "blue",
             help=f"against width {atlas.widths[atlas.widths.index(width) - 1]}")
flag = badge(row.get("density"), row.get("label"))
if flag:
    st.badge(flag, color="gray" if flag == "dead" else "red",
             help="never fired on the statistics tokens" if flag == "dead" else
             f"fires on more than {DENSE:g} of all tokens (always-on latents crowd every token's top list)")

m = st.columns(6)
m[0].metric("Density", fmt(row.get("density"), 3), help="fraction of tokens where it fires")
m[1].metric("Mean act", fmt(row.get("mean_act"), 3))
m[2].metric("Max act", fmt(row.get("max_act"), 3))
for col, (name, value, help_) in zip(m[3:], effects(row)[:3], strict=False):
    col.metric(name, fmt(value, 3), help=help_)
if row.get("decomp_fvu") is not None:  # issue 12.2: how well and how sparsely the meta-SAE explains it
    from metasae.search import decomp_score

    d = st.columns(6)
    d[0].metric("Decomposability", fmt(float(decomp_score(row["decomp_fvu"], row.get("decomp_entropy") or 0.0)), 3),
                help="(1 − meta-SAE FVU) × (1 − 1/n_eff): high = composite (explained well by several meta-latents), "
                     "near 0 = atomic (unexplained, or one meta-latent). See docs/intervention.md.")
    d[1].metric("Meta-SAE FVU", fmt(row["decomp_fvu"], 3), help="||u − û||² of the unit decoder row")
    d[2].metric("Meta-latents", fmt(row.get("decomp_terms")), help="active meta-latents of the unit row")
    d[3].metric("Weight entropy", fmt(row.get("decomp_entropy"), 3),
                help="entropy (nats) of the normalised meta-latent weights; exp of it = effective number")
ui.page_link("intervene", "Edit this latent (intervention lab)", {"width": width, "latent": latent},
             icon=":material/tune:")

left, right = st.columns([1, 1])
with left, ui.guard():
    st.subheader("Meta-decomposition")
    dec = view.decomposition
    if dec.empty:
        st.info("The meta-SAE gives this latent no meta-latents.")
    else:
        st.plotly_chart(plots.decomposition_figure(dec), key="decomp")
        ui.table(dec.assign(label=dec["label"].map(show_token)), f"decomposition_{width}_{latent}",
                 column_config={"weight": st.column_config.NumberColumn("weight", format="%.4f")})
with right, ui.guard():
    st.subheader("Activations")
    st.plotly_chart(plots.histogram_figure(row.get("hist_counts"), row.get("hist_edges")), key="hist")
    st.markdown("**Top boosted tokens** (through the unembedding)")
    ui.chips(row.get("top_logits"))
    st.markdown("**Top activating tokens**")
    ui.chips(row.get("top_tokens"))

st.subheader("Latent → meta-latents → latents that share them")
with ui.guard():
    graph = radial_graph(atlas, width, latent)
    event = st.plotly_chart(plots.radial_figure(graph), key=f"radial-{ctx.key}-{width}-{latent}", on_select="rerun",
                            selection_mode="points", config={"displayModeBar": False})
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    if points:  # a click on a node: go there
        node_id = points[0].get("customdata")
        if node_id is not None and int(node_id) in graph.nodes.index and int(node_id) != 0:
            page, params = node_params(graph.nodes.loc[int(node_id)])
            st.switch_page(ui.PAGES[page], query_params=ui.link_params(**params))
    st.caption("Click a node, or follow a link:")
    metas = graph.nodes[graph.nodes["kind"] == "meta"]
    cols = st.columns(max(len(metas), 1))
    for col, (nid, node) in zip(cols, metas.iterrows(), strict=False):
        with col:
            ui.meta_link(node["meta_latent"], node["label"], extra=f" ({node['weight']:.2f})")
            for o in graph.children(nid).itertuples(index=False):
                ui.latent_link(o.sae_width, o.latent, o.label,
                               extra=f"  ({o.weight:.2f})" + (f" · {o.flag}" if o.flag else ""))

st.subheader("Family across the ladder")
with ui.guard():
    fam = view.family
    f1, f2, f3 = st.columns(3)
    for col, side, title, none in ((f1, "smaller", "Nearest in the smaller width", "— (smallest width)"),
                                   (f2, "larger", "Nearest in the larger width", "— (largest width)")):
        col.markdown(f"**{title}**")
        near = fam.get(side)
        with col:
            if near:
                ui.latent_link(near["sae_width"], near["latent"], near["label"],
                               extra=f"  (cos {fmt(near['cos'], 3)})")
            else:
                st.caption(none)
    lg = fam.get("larger")
    with f2:
        children = [c for c in fam.get("children") or [] if not lg or c["latent"] != lg["latent"]]
        if children and lg:
            st.caption("Other larger latents whose nearest smaller latent is this one:")
            for c in children[:8]:
                ui.latent_link(lg["sae_width"], c["latent"], c["label"], extra=f"  (cos {fmt(c['cos'], 3)})")
    with f3:
        st.markdown("**Swap group**")
        group = [g for g in fam.get("group") or [] if g != latent]
        if fam.get("group_id") is None:
            st.caption("None: a novel latent is added on its own.")
        else:
            n_group = len(fam.get("group") or [])
            st.caption(f"group {fam['group_id']} · " + (f"{n_group} latents of width {width} swapped in together"
                                                         if n_group > 1 else "only this latent"))
            for g in group[:10]:
                ui.latent_link(width, g, atlas.latent(width, g)["label"])
    eff = effects(row)
    if eff:
        ui.table(pd.DataFrame({"effect": [e[0] for e in eff], "value": [fmt(e[1], 4) for e in eff],
                               "meaning": [e[2] for e in eff]}), f"effects_{width}_{latent}")

st.subheader("Family tree across the whole ladder")
with ui.guard():  # issue 12.3: nearest latents by decoder cosine in every smaller and larger width
    from metasae import family

    if not atlas.manifest.weights:
        st.caption("This atlas has no SAE weights: the decoder cosines cannot be computed.")
    else:
        tree = family.latent_family(atlas, width, latent, k=3)
        st.plotly_chart(family.tree_figure(tree, f"Nearest 3 latents of {width}/{latent} in every width"),
                        key=f"tree-{width}-{latent}")
        others = tree.iloc[1:]
        ui.table(ui.with_links(with_badges(others.assign(label=others["label"].map(show_token)))),
                 f"family_tree_{width}_{latent}", column_config={**ui.LINK_COLUMN,
                 "cos": st.column_config.NumberColumn("cos to this latent", format="%.3f"),
                 "parent_cos": st.column_config.NumberColumn("cos to parent", format="%.3f")})

st.subheader("Top examples")
with ui.guard():
    if not view.examples:
        st.info("No examples stored for this latent (it never fired on the corpus sample).")
    scale = max([float(e.get("activation") or 0) for e in view.examples] + [0.0])
    for ex in view.examples:
        a, b = st.columns([1, 12])
        a.markdown(f"`{fmt(ex.get('activation'), 3)}`")
        b.markdown(example_html(ex.get("tokens") or [], ex.get("acts"), ex.get("position"), scale),
                   unsafe_allow_html=True)
