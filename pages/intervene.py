"""Intervene: edit one latent on your prompt — whole-latent ablation vs removing one meta-latent, sliders on its
meta-latents — and compare the model's next-token predictions (POST /v1/intervene on the backend)."""

import json

import streamlit as st

from metasae import app_state, intervene, ui
from metasae.views.latent import latent_view
from metasae.views.meta_latent import meta_label
from metasae.views.text import show_token

ctx, atlas = ui.require_atlas()
st.title("Intervention lab")
st.caption("Does editing a meta-latent change one attribute while leaving the others alone, where ablating the "
           "whole latent changes everything? Edits act on the residual stream at the atlas's hook: ablation "
           "subtracts a·d of the latent; removing a meta-latent subtracts a·‖d‖·w·e of that meta-latent only.")

width, latent, url_error = ui.latent_picker(atlas, "iv")
if url_error:
    st.error(url_error)
    st.stop()
view = latent_view(atlas, width, latent)
ui.latent_link(width, latent, view.row.get("label"), extra="  ← back to the latent page")
dec = view.decomposition
metas = [int(m) for m in dec["meta_latent"]] if not dec.empty else []

problems: list[str] = []
try:
    scales = intervene.parse_scales(ui.param("s"), metas)
except ValueError as e:
    scales, problems = {}, [str(e)]
try:
    remove = app_state.parse_int(ui.param("rm"), "Meta-latent to remove")
except app_state.BadInput as e:
    remove, problems = None, [*problems, str(e)]
if remove not in metas:
    remove = metas[0] if metas else None
try:
    gen = min(max(app_state.parse_int(ui.param("gen"), "Continuation tokens") or 0, 0), 32)
except app_state.BadInput as e:
    gen, problems = 0, [*problems, str(e)]
positions = ui.param("pos") if ui.param("pos") in ("all", "fires") else "all"

prompt = ui.param("prompt")
prompt = intervene.default_prompt(view.examples) if prompt is None else prompt
top_logits = [t for t in (view.row.get("top_logits") or [])[:3] if t]
targets_text = ui.param("targets")
targets = intervene.parse_targets(targets_text if targets_text is not None else intervene.TARGET_SEP.join(top_logits))

c1, c2 = st.columns([3, 2])
ui.bind("iv_prompt", prompt)
c1.text_area("Prompt (the edit is judged on the next token after it)", key="iv_prompt", height=90,
             on_change=ui.to_url("iv_prompt", "prompt"))
ui.bind("iv_targets", intervene.TARGET_SEP.join(targets))
c2.text_input("Tokens to watch, separated by |  (leading spaces matter: ' Germany| physics')", key="iv_targets",
              on_change=ui.to_url("iv_targets", "targets"))
p1, p2 = c2.columns(2)
ui.bind("iv_pos", positions)
p1.selectbox("Edit at", ["all", "fires"], key="iv_pos", on_change=ui.to_url("iv_pos", "pos", default="all"),
             format_func={"all": "every token", "fires": "tokens where it fires"}.get)
ui.bind("iv_gen", gen)
p2.number_input("Continuation tokens", min_value=0, max_value=32, step=4, key="iv_gen",
                on_change=ui.to_url("iv_gen", "gen", encode=int, default=0))
for p in problems:
    st.error(p)

st.subheader(f"Its meta-latents ({len(metas)})")
if not metas:
    st.info("The meta-SAE gives this latent no meta-latents: only whole-latent ablation is possible.")
else:
    def scales_to_url() -> None:
        moved = {m: st.session_state[f"iv_s{m}"] for m in metas if st.session_state[f"iv_s{m}"] != 1.0}
        ui.set_params(s=",".join(f"{m}:{v:g}" for m, v in sorted(moved.items())) or None)

    cols = st.columns(min(len(metas), 4))
    for i, r in enumerate(dec.itertuples(index=False)):
        with cols[i % len(cols)]:
            ui.bind(f"iv_s{int(r.meta_latent)}", float(scales.get(int(r.meta_latent), 1.0)))
            st.slider(f"meta {int(r.meta_latent)} · {show_token(r.label)} (weight {r.weight:.3f})",
                      min_value=-1.0, max_value=2.0, step=0.1, key=f"iv_s{int(r.meta_latent)}",
                      on_change=scales_to_url, help="factor on this meta-latent's weight in the latent: 0 removes "
                                                     "it, 1 keeps it, 2 doubles it")
    ui.bind("iv_rm", remove)
    st.selectbox("Side by side with ablating the whole latent: remove one meta-latent", metas, key="iv_rm",
                 format_func=lambda m: f"meta {m} · {meta_label(atlas, m)}",
                 on_change=ui.to_url("iv_rm", "rm", encode=int))


@st.cache_data(show_spinner="Running the edits on the model …", max_entries=64, ttl=3600)
def run(key: str, body_json: str, _backend) -> dict:
    return intervene.via_backend(_backend, json.loads(body_json))


if not prompt.strip():
    st.info("Type a prompt: the edits are compared on the model's prediction of the token after it.")
    st.stop()
backend, why = ui.backend(ctx)
if backend is None:
    st.warning(why or "No backend: the edits need the language model.")
    st.stop()
body = intervene.lab_body(width, latent, prompt, targets, remove, scales, positions, gen)
with ui.guard():
    try:
        result = run(ui.atlas_key(ctx), json.dumps(body, sort_keys=True), backend)
    except Exception as e:  # the backend's refusal names the field (BackendError); shown, not raised
        st.error(f"The backend could not run these edits: {e}")
        st.stop()
    st.subheader("Clean vs edited")
    st.caption(f"Prompt tokens: {len(result['tokens'])} · the edits touched "
               + ", ".join(f"{e['name']}: {e['n_positions']}" for e in result["edits"]) + " tokens")
    ui.table(intervene.summary_table(result), f"intervene_{width}_{latent}")
    if result.get("targets"):
        st.plotly_chart(intervene.targets_figure(result), key="iv_targets_fig")
    cols = st.columns(1 + len(result["edits"]))
    for col, (name, part) in zip(cols, [("clean", result["clean"])] + [(e["name"], e) for e in result["edits"]],
                                 strict=True):
        with col:
            st.markdown(f"**{name}**" + (f" · KL {part['kl']:.3g}" if "kl" in part else ""))
            st.dataframe([{"token": show_token(t["token"]), "prob": round(t["prob"], 4)} for t in part["top"]],
                         hide_index=True)
            if part.get("continuation") is not None:
                st.caption("continues: " + show_token(part["continuation"]))
