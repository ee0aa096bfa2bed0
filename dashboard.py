"""The dashboard's Streamlit script, served by app.py (``streamlit run app.py``; the bundled atlas in data/).

Other atlases: ``streamlit run app.py -- --atlas PATH_OR_HUB_ID[,MORE]`` or ``METASAE_ATLAS=PATH[,MORE]``;
several can be switched in the sidebar. This file only wires the pages and opens atlases once per process
(st.cache_resource); the pages live in pages/, the logic in metasae/ (app_state, views, plots, ui).
"""

from __future__ import annotations

import sys

import streamlit as st

from metasae import app_state, ui
from metasae.atlas import Atlas, AtlasError

st.set_page_config(page_title="metasae atlas", page_icon=":material/hub:", layout="wide")


@st.cache_resource(show_spinner="Opening and verifying the atlas …", max_entries=8)
def open_atlas(spec: str, kind: str, key: str, bundled: bool) -> Atlas:
    # Failures raise, and Streamlit does not cache exceptions: a missing atlas is looked for again next run.
    return app_state.open_source(app_state.AtlasSource(spec=spec, key=key, kind=kind, bundled=bundled))


def choose_source(sources: list[app_state.AtlasSource], notes: list[str]) -> app_state.AtlasSource:
    wanted = ui.param("atlas") or st.session_state.get("_atlas_key")
    try:
        source = app_state.pick_source(sources, wanted)
    except app_state.BadInput as e:
        notes.append(str(e))
        source = sources[0]
    st.session_state["_atlas_key"] = source.key
    if len(sources) > 1:
        ui.set_params(atlas=source.key)
        ui.bind("atlas_pick", source.key)
        # a new atlas: the other selections (width, latent ...) belong to the old one
        st.sidebar.selectbox("Atlas", [s.key for s in sources], key="atlas_pick",
                             format_func=lambda k: next(s.title for s in sources if s.key == k),
                             on_change=lambda: (st.query_params.clear(),
                                                ui.set_params(atlas=st.session_state["atlas_pick"])))
    return source


def main() -> None:
    sources = app_state.sources_from(sys.argv[1:])
    notes: list[str] = []
    source = choose_source(sources, notes)
    atlas, error = None, None
    try:
        atlas = open_atlas(source.spec, source.kind, source.key, source.bundled)
    except AtlasError as e:
        error = str(e)
    except Exception as e:  # whatever else a damaged folder or a failed download raises
        error = f"{source.spec}: cannot be opened ({type(e).__name__}: {e})"
    ui.set_context(ui.Context(sources, source, atlas, error, notes))
    if atlas is not None:
        ui.warm_backend(str(atlas.path), atlas)  # the model loads while the visitor reads the Overview

    if atlas is not None:
        st.sidebar.caption(f"**{source.title}** · model `{atlas.manifest.model.name}` · widths "
                           f"{', '.join(map(str, atlas.widths))} · {atlas.n_meta_latents} meta-latents")
    else:
        st.sidebar.caption(f"**{source.title}**: not opened")

    page = st.navigation(ui.navigation_pages())
    name = page.url_path or "overview"
    ui.remember_params(name)
    ui.fix_history()
    ui.sync_url(name)
    page.run()


main()
