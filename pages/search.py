"""Search: free text over labels, top tokens and example text; or latents by their meta-decomposition."""

import streamlit as st

from metasae import app_state, ui
from metasae.views.badges import with_badges
from metasae.views.meta_latent import meta_options
from metasae.views.search import decomp_search, meta_search, text_search
from metasae.views.text import show_token

ctx, atlas = ui.require_atlas()
st.title("Search latents")

MODES = {"text": "Text", "meta": "By meta-latents", "decomp": "By decomposability"}
ORDERS = {"composite": "Most composite", "atomic": "Most atomic"}
problems: list[str] = []


def url(fn, name, *args):
    """A parsed URL parameter; a bad one is reported and ignored."""
    try:
        return fn(ui.param(name), *args)
    except app_state.BadInput as e:
        problems.append(str(e))
        return None


def csv(values):
    return ",".join(map(str, values))


mode = ui.param("mode") if ui.param("mode") in MODES else "text"
ui.bind("s_mode", mode)
st.segmented_control("Search", list(MODES), key="s_mode", format_func=MODES.get, required=True,
                     label_visibility="collapsed", on_change=ui.to_url("s_mode", "mode", default="text"))

if mode == "text":
    q = ui.param("q") or ""
    ui.bind("s_q", q[: app_state.MAX_QUERY_CHARS * 2])
    st.text_input("Text: labels, top tokens and the tokens around each example's peak", key="s_q",
                  placeholder="a word, a token, part of a label … e.g. einstein",
                  on_change=ui.to_url("s_q", "q", default=""))
elif mode == "decomp":
    order = ui.param("order") if ui.param("order") in ORDERS else "composite"
    ui.bind("s_order", order)
    st.segmented_control("Order", list(ORDERS), key="s_order", format_func=ORDERS.get, required=True,
                         on_change=ui.to_url("s_order", "order", default="composite"),
                         help="score = (1 − meta-SAE FVU) × (1 − 1/n_eff), n_eff = exp(entropy of the meta-latent "
                              "weights): high when the meta-SAE explains the latent well with several meta-latents "
                              "(composite); near 0 when it cannot, or when one meta-latent does (atomic). "
                              "Dead latents are left out.")
    d1, d2, d3 = st.columns(3)
    max_fvu = url(app_state.parse_float, "fvu", "Maximum FVU")
    tmin, tmax = url(app_state.parse_int, "tmin", "Minimum meta-latents"), url(app_state.parse_int, "tmax",
                                                                              "Maximum meta-latents")
    for col, key, name, label, value in ((d1, "s_fvu", "fvu", "max meta-SAE FVU", max_fvu),
                                         (d2, "s_tmin", "tmin", "min meta-latents", tmin),
                                         (d3, "s_tmax", "tmax", "max meta-latents", tmax)):
        ui.bind(key, value)
        col.number_input(label, value=None, key=key, min_value=0.0 if key == "s_fvu" else 0,
                         step=0.05 if key == "s_fvu" else 1, placeholder="—",
                         on_change=ui.to_url(key, name, encode=lambda v: f"{v:g}"))
else:
    options = meta_options(atlas)
    names = dict(options)
    metas = [m for m in (url(app_state.parse_int_list, "metas", "Meta-latent") or []) if m in names]
    minw = url(app_state.parse_float, "minw", "Minimum weight")
    minw = 0.0 if minw is None else min(max(minw, 0.0), 10.0)
    c1, c2 = st.columns([3, 1])
    ui.bind("s_metas", metas)
    c1.multiselect("Latents whose decomposition holds all of these meta-latents", [m for m, _ in options],
                   key="s_metas", format_func=lambda m: names.get(m, str(m)), placeholder="pick meta-latents",
                   on_change=ui.to_url("s_metas", "metas", encode=csv, default=[]))
    ui.bind("s_minw", float(minw))
    c2.number_input("each with weight ≥", min_value=0.0, max_value=10.0, step=0.05, key="s_minw",
                    on_change=ui.to_url("s_minw", "minw", encode=lambda v: f"{v:g}", default=0.0))

widths = [w for w in (url(app_state.parse_int_list, "w", "Width") or []) if w in atlas.widths]
kinds = ["any", "novel", "reconstruction"]
kind = ui.param("kind") if ui.param("kind") in kinds else "any"
FILTERS = [("dmin", "min density"), ("dmax", "max density"), ("emin", "min ΔMSE"), ("emax", "max ΔMSE")]
bounds = {name: url(app_state.parse_float, name, label) for name, label in FILTERS}
active = bool(widths) or kind != "any" or any(v is not None for v in bounds.values())
with st.expander("Filters" + (" (active)" if active else ""), expanded=active):
    f1, f2 = st.columns(2)
    ui.bind("s_widths", widths)
    f1.multiselect("Widths", atlas.widths, key="s_widths", placeholder="all widths",
                   on_change=ui.to_url("s_widths", "w", encode=csv, default=[]))
    if mode == "text":
        ui.bind("s_kind", kind)
        f2.selectbox("Kind (against the next smaller width)", kinds, key="s_kind",
                     on_change=ui.to_url("s_kind", "kind", default="any"))
        for col, (name, label) in zip(st.columns(4), FILTERS, strict=True):
            ui.bind(f"s_{name}", bounds[name])
            col.number_input(label, value=None, key=f"s_{name}", format="%.2e", placeholder="—",
                             on_change=ui.to_url(f"s_{name}", name, encode=lambda v: f"{v:g}"))

for p in problems:
    st.error(p)

PER_PAGE = 100
page = url(app_state.parse_int, "page", "Page") or 1
page = min(max(page, 1), 10_000)
# one fixed limit for every page: the index ranks ties and lower match bands by what the limit leaves room for,
# so asking each page for just enough would let pages overlap
MAX_RESULTS = 5000
limit = MAX_RESULTS + 1
results = None
with ui.guard():
    index = ui.search_index(ui.atlas_key(ctx), atlas)
    if mode == "text":
        out = text_search(index, q, widths=widths, kind=None if kind == "any" else kind,
                                min_density=bounds["dmin"], max_density=bounds["dmax"],
                                min_delta_mse=bounds["emin"], max_delta_mse=bounds["emax"], limit=limit)
    elif mode == "decomp":
        out = decomp_search(index, order, widths=widths, max_fvu=max_fvu, min_terms=tmin, max_terms=tmax,
                                  limit=limit)
    else:
        out = meta_search(index, metas, minw, widths=widths, limit=limit)
    if out.warning:
        st.warning(out.warning)
    if out.message:
        st.info(out.message)
    results = out.results

if results is not None and len(results):
    more = min(len(results), MAX_RESULTS) > page * PER_PAGE
    shown = results.iloc[(page - 1) * PER_PAGE: page * PER_PAGE]
    if shown.empty:
        st.info(f"Page {page} is past the last result ({len(results):,} latents match); showing page 1.")
        page, shown = 1, results.iloc[:PER_PAGE]
        more = min(len(results), MAX_RESULTS) > PER_PAGE
    first = (page - 1) * PER_PAGE + 1
    n = min(len(results), MAX_RESULTS)
    st.markdown(f"**Latents {first:,}–{first + len(shown) - 1:,}** of {n:,}"
                + (" (the best; narrow the search to see others)" if len(results) > MAX_RESULTS else ""))
    for r in shown.head(10).itertuples(index=False):
        how = getattr(r, "match", "") or (f"decomposability {r.score:.3f} (FVU {r.decomp_fvu:.2f}, "
                                          f"{r.decomp_terms:.0f} meta-latents)" if mode == "decomp"
                                          else f"summed weight {r.score:.3f}")
        ui.latent_link(r.sae_width, r.latent, r.label, extra=f"  — {how}")
    table = ui.with_links(with_badges(shown.assign(label=shown["label"].map(show_token))))
    ui.table(table, f"search_page{page}", column_config={
        **ui.LINK_COLUMN, **ui.DELTA_COLUMNS, "score": st.column_config.NumberColumn("score", format="%.3f"),
        "decomp_fvu": st.column_config.NumberColumn("meta-SAE FVU", format="%.3f"),
        "decomp_entropy": st.column_config.NumberColumn("entropy", format="%.3f")})
    here = {k: v for k, v in st.query_params.to_dict().items() if k != "page"}
    p1, p2, _ = st.columns([1, 1, 4])
    with p1:
        if page > 1:
            ui.page_link("search", f"← Page {page - 1}", {**here, "page": page - 1 if page > 2 else None})
    with p2:
        if more:
            ui.page_link("search", f"Page {page + 1} →", {**here, "page": page + 1})
