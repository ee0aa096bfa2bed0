"""Stitching: one pair of neighbouring widths — its interpolation curves, the novel / reconstruction latents with
their ΔMSE / ΔCE and swap groups, and a fresh evaluation through the backend."""

import streamlit as st

from metasae import app_state, plots, ui
from metasae.views.badges import with_badges
from metasae.views.stitching import fresh_differences, fresh_stitch, pair_summary, stitching_table
from metasae.views.text import fmt

ctx, atlas = ui.require_atlas()
st.title("SAE stitching")

pairs = app_state.page_pairs(atlas)
try:
    small, large = app_state.resolve_pair(atlas, ui.param("pair"))
    url_error = None
except app_state.BadInput as e:
    (small, large), url_error = pairs[0] if pairs else (None, None), str(e)
if not pairs:
    st.error(url_error or "This atlas has no stitching pairs.")
    st.stop()

labels = {f"{a}-{b}": f"{a} → {b}" for a, b in pairs}
ui.bind("st_pair", f"{small}-{large}")
st.selectbox("Pair (small → large)", list(labels), key="st_pair", format_func=labels.get,
             on_change=ui.to_url("st_pair", "pair"))
if url_error:
    st.error(url_error)
    st.stop()

summary = pair_summary(atlas, small, large)
m = st.columns(5)
m[0].metric("Novel latents", f"{summary['novel_frac']:.0%}" if plots.finite(summary.get("novel_frac")) else "—",
            help=f"of the {large} latents, max cosine with any {small} latent below the threshold")
m[1].metric("Swap groups", fmt(summary.get("n_groups")))
m[2].metric("Steps: add / swap / remove", " / ".join(fmt(summary.get(k)) for k in ("n_add", "n_swap", "n_remove")))
m[3].metric("ΔCE attribution vs exact", fmt(summary.get("attr_spearman"), 3),
            help="Spearman rank correlation with exact ablation ΔCE on the sampled latents, of the attribution "
                 "estimate stored in the table" + (
                     f" (its {summary['attr_exact_pairs']:,} largest latent-context terms computed exactly; "
                     f"first-order attribution alone: {fmt(summary.get('attr_spearman_plain'), 3)})"
                     if summary.get("attr_exact_pairs") else ""))
m[4].metric("Cosine threshold", fmt(atlas.manifest.stitching.threshold, 3))

curve = atlas.stitching_curve(small, large)  # empty without the (optional) stitching table
if not atlas.has_table("stitching"):  # the latents' kinds and deltas below still hold
    st.info("No interpolation curves. " + atlas.missing_table_message("stitching"))
else:
    c1, c2 = st.columns([3, 2])
    with c1, ui.guard():
        st.plotly_chart(plots.stitch_path_figure(curve, small, large), key="path")
    with c2, ui.guard():
        st.plotly_chart(plots.stitch_ce_figure(curve, small, large), key="ce")

st.subheader(f"Latents of width {large}")
with ui.guard():
    kinds = ["all", "novel", "reconstruction"]
    kind = ui.param("kind") if ui.param("kind") in kinds else "all"
    ui.bind("st_kind", kind)
    st.segmented_control("Kind", kinds, key="st_kind", required=True, on_change=ui.to_url("st_kind", "kind",
                                                                                          default="all"))
    table = with_badges(stitching_table(atlas, small, large, None if kind == "all" else kind))
    t1, t2 = st.columns(2)
    with t1:
        st.plotly_chart(plots.delta_scatter(table), key="dscatter")
    with t2:
        if "delta_ce_attr" in table and table["delta_ce_attr"].notna().any():
            st.plotly_chart(plots.delta_scatter(table, "delta_ce", "delta_ce_attr", "ΔCE: exact vs attribution"),
                            key="attr")
    st.caption("Click a column header to sort; the first column opens the latent.")
    ui.table(ui.with_links(table.assign(sae_width=large)).drop(columns=["sae_width"]), f"stitching_{small}_{large}",
             column_config={**ui.LINK_COLUMN,
                                "nearest_smaller": st.column_config.NumberColumn(f"nearest in {small}", format="%d"),
                                "nearest_smaller_cos": st.column_config.NumberColumn("cos", format="%.3f"),
                                "group_id": st.column_config.NumberColumn("swap group", format="%d"),
                                **ui.DELTA_COLUMNS})

st.subheader("Run a fresh evaluation")
st.caption("Measure this pair again on your own text or on more tokens of the atlas's corpus, through the metasae "
           "backend (a GPU service when METASAE_BACKEND_URL is set, else a local process started on first use).")
JOB, RESULTS = "stitch_job", "stitch_results"
pair_key = f"{ctx.key}:{small}-{large}"
with st.form("fresh"):
    text = st.text_area("Text (optional; when empty, tokens of the atlas's corpus are used)",
                        max_chars=app_state.MAX_TEXT_CHARS * 10)
    n_tokens = st.number_input("Corpus tokens (when no text is given)", min_value=256, max_value=262_144,
                               value=8192, step=1024)
    submitted = st.form_submit_button("Run evaluation", type="primary", disabled=bool(st.session_state.get(JOB)))
if submitted:
    backend, why = ui.backend(ctx)
    if backend is None:
        st.warning(why)
    else:
        with ui.guard():
            started = backend.start_stitch(small, large, text=text.strip() or None,
                                           n_tokens=None if text.strip() else int(n_tokens))
            st.session_state[JOB] = {"id": started["job_id"], "pair": pair_key}
            ui.set_params(job=started["job_id"])  # the URL names the job: a reload or a shared link shows it


def fetch_job(job_id: str) -> dict | None:
    """The backend's record of a job named in the URL (None, with the reason shown, when it has none)."""
    backend, why = ui.backend(ctx)
    if backend is None:
        st.warning(why)
        return None
    try:
        return backend.job(job_id)
    except Exception as e:  # the backend restarted (it forgets jobs) or the id is made up
        st.warning(f"The backend has no evaluation {app_state.short(job_id, 40)!r} (finished jobs live as long as "
                   f"the backend keeps them; a restarted backend forgets them): run it again. ({e})")
        return None


url_job = ui.param("job")
if url_job and not st.session_state.get(JOB) and url_job not in st.session_state.get(RESULTS, {}):
    state = fetch_job(url_job)
    if state is not None:
        if state.get("status") in ("queued", "running"):
            st.session_state[JOB] = {"id": url_job, "pair": pair_key}
        else:
            st.session_state.setdefault(RESULTS, {})[url_job] = state


@st.fragment(run_every=1.0)
def job_progress() -> None:
    """Polls the running job once a second; when it ends, one full rerun shows the result."""
    job = st.session_state.get(JOB)
    backend, why = ui.backend(ctx)
    if not job:
        return
    if backend is None:
        st.warning(why)
        return
    try:
        state = backend.job(job["id"])
    except Exception as e:  # the backend restarted and forgot the job, or went away
        st.session_state.pop(JOB, None)
        ui.show_error(e)
        return
    status = state.get("status")
    st.progress(min(max(float(state.get("progress") or 0.0), 0.0), 1.0),
                text=f"{job['pair'].split(':')[-1]}: {status} — {state.get('message', '')}")
    if status in ("done", "failed", "cancelled"):
        st.session_state.pop(JOB, None)
        st.session_state.setdefault(RESULTS, {})[job["id"]] = state
        st.rerun(scope="app")
    elif st.button("Cancel evaluation"):
        backend.cancel(job["id"])


if st.session_state.get(JOB):
    job_progress()
done = st.session_state.get(RESULTS, {}).get(url_job) if url_job else None
if done:
    with ui.guard():
        req = done.get("request") or {}
        if req.get("small") not in (None, small) or req.get("large") not in (None, large):
            st.info(f"The evaluation in the URL is of pair {req.get('small')} → {req.get('large')}; pick that pair "
                    "to see it.")
        elif done.get("status") != "done":
            st.error(f"The evaluation {done.get('status')}: {done.get('message', '')}")
        else:
            result = done.get("result") or {}
            fresh = fresh_stitch(atlas, small, large, result)
            st.success(f"Fresh evaluation on {fmt(fresh.n_tokens)} tokens: ΔMSE rank correlation with the "
                       f"atlas {fmt(fresh.rank_corr, 3)}, same kind for "
                       + (f"{fresh.kind_agreement:.0%}" if fresh.kind_agreement is not None else "—")
                       + " of the latents.")
            for line in fresh_differences(atlas, small, large, result, req):
                st.caption(line)
            st.plotly_chart(plots.fresh_curve_figure(curve, fresh.curve, small, large), key="fresh")
            ui.table(ui.with_links(fresh.latents.assign(sae_width=large)).drop(columns=["sae_width"]),
                     f"fresh_{small}_{large}", column_config=ui.LINK_COLUMN)
