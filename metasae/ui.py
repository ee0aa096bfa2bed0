"""Streamlit glue shared by the pages: the opened atlas, URL-bound widgets, links and error display.

Kept small on purpose: what a page shows is computed in ``metasae.views`` (a module per page) and drawn by
``metasae.plots``; this module only moves values between the URL (``st.query_params``), widgets and those functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import streamlit as st

from metasae import app_state, weights
from metasae.app_state import AtlasSource, BadInput
from metasae.atlas import Atlas, AtlasError, UnknownLatentError
from metasae.views import render
from metasae.views.text import latent_name, show_token


@dataclass(frozen=True)
class PageSpec:
    """One dashboard page: its URL path (also its name in links), script, sidebar title and icon."""

    name: str
    title: str
    icon: str

    @property
    def script(self) -> str:
        return f"pages/{self.name}.py"


# The one place pages are registered: the sidebar order, the first is the default page (served at /).
PAGE_SPECS = (
    PageSpec("overview", "Overview", ":material/insights:"),
    PageSpec("latent", "Latent", ":material/scatter_plot:"),
    PageSpec("meta_latent", "Meta-latent", ":material/hub:"),
    PageSpec("search", "Search", ":material/search:"),
    PageSpec("stitching", "Stitching", ":material/call_merge:"),
    PageSpec("live", "Live", ":material/bolt:"),
    PageSpec("intervene", "Intervene", ":material/tune:"),
)
PAGES = {p.name: p.script for p in PAGE_SPECS}


def navigation_pages() -> list[Any]:
    """The st.Page objects for st.navigation, in PAGE_SPECS order."""
    return [st.Page(p.script, title=p.title, icon=p.icon, default=i == 0, url_path=None if i == 0 else p.name)
            for i, p in enumerate(PAGE_SPECS)]
_CTX = "_metasae_context"


@dataclass
class Context:
    """What app.py hands every page: the sources, the chosen one, and its atlas (or why it failed)."""

    sources: list[AtlasSource]
    source: AtlasSource | None
    atlas: Atlas | None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.source.key if self.source else ""


def set_context(ctx: Context) -> None:
    st.session_state[_CTX] = ctx


def context() -> Context:
    ctx = st.session_state.get(_CTX)
    if ctx is None and not st.session_state.get("_metasae_rerun"):
        # The very first request a fresh server gets for a page URL is routed by Streamlit's legacy pages/
        # folder scan, which runs the page without app.py; that run also switches the server to app.py's
        # st.navigation; that legacy routing stays on until app.py's st.navigation runs once. Switch it off
        # and rerun: the rerun goes through app.py, which routes back to this page with the context set.
        st.session_state["_metasae_rerun"] = True
        with contextlib.suppress(Exception):  # a Streamlit internal; without it the user sees the message below
            from streamlit.runtime.pages_manager import PagesManager

            PagesManager.uses_pages_directory = False
        st.rerun()
    if ctx is None:
        st.error("Start the dashboard with `streamlit run app.py`; this page needs app.py to open the atlas.")
        st.stop()
    return ctx


def require_atlas() -> tuple[Context, Atlas]:
    """The context and its opened atlas; without one, the reason is shown and the page stops."""
    ctx = context()
    for note in ctx.notes:
        st.warning(note)
    if ctx.atlas is None:
        st.error(ctx.error or "No atlas is open.")
        st.stop()
    return ctx, ctx.atlas


# --------------------------------------------------------------------------------------------- cached heavy things


@st.cache_resource(show_spinner="Building the search index …", max_entries=8)
def search_index(key: str, _atlas: Atlas) -> Any:
    from metasae.search import SearchIndex

    return SearchIndex(_atlas)


@st.cache_resource(show_spinner="Loading the meta-SAE …", max_entries=8)
def meta_sae(key: str, _atlas: Atlas) -> Any:
    return weights.load_meta_sae(_atlas)


@st.cache_resource(show_spinner="Loading SAE decoder …", max_entries=16)
def decoder(key: str, width: int, _atlas: Atlas) -> Any:
    return weights.load_decoder(_atlas, width)


@st.cache_resource(show_spinner=False, max_entries=16)
def densities(key: str, width: int, _atlas: Atlas) -> pd.Series:
    """Density of every latent of one width, indexed by latent (for dead / dense flags)."""
    t = _atlas.latents_table(width, ["latent", "density"])
    return pd.Series(t["density"].to_numpy(dtype=float), index=t["latent"].to_numpy())


@st.cache_resource(show_spinner="Starting / connecting to the metasae backend …", ttl=300, max_entries=4)
def _backend(key: str) -> tuple[Any, str | None]:
    return app_state.get_backend(key or None)


def backend(ctx: Context) -> tuple[Any, str | None]:
    """(backend for the open atlas, None) or (None, why not); a failure is retried on the next call."""
    b, why = _backend(atlas_key(ctx))
    if b is None:
        _backend.clear()  # do not remember a failure: the backend may come up later
        return None, why
    try:
        problem = app_state.backend_problem(b.health(), ctx.atlas) if ctx.atlas is not None else None
    except Exception as e:  # it died since: forget it, say so
        _backend.clear()
        return None, f"Backend unavailable: {e}"
    return (None, problem) if problem else (b, None)


@st.cache_data(show_spinner="Running the model on your text …", max_entries=64, ttl=3600)
def activations(key: str, text: str, width: int, top_k: int, _backend: Any) -> dict:
    """Backend per-token activations, remembered per (atlas, text, width) so reruns do not recompute."""
    return _backend.activations(text, width, top_k=top_k)


@st.cache_resource(show_spinner=False, max_entries=8)
def warm_backend(key: str, _atlas: Atlas) -> bool:
    """Once per atlas and server process: start the local backend and its model loading in the background."""
    return app_state.warm_backend(_atlas)


def atlas_key(ctx: Context) -> str:
    """Cache key of the open atlas (its folder, so two atlases never share a cache entry)."""
    return str(ctx.atlas.path) if ctx.atlas is not None else ""


# --------------------------------------------------------------------------------------------- URL state


def param(name: str) -> str | None:
    """A URL query parameter (the last value when repeated), or None."""
    try:
        v = st.query_params.get(name)
    except Exception:
        return None
    return None if v is None else str(v)


def set_params(**values: Any) -> None:
    """Write URL query parameters; None or '' removes one."""
    for k, v in values.items():
        if v is None or v == "" or v == []:
            st.query_params.pop(k, None)
        else:
            st.query_params[k] = str(v)


def sync_url(page: str) -> None:
    """Send the run's query parameters back to the browser (only when the page did not change in this run).

    A page link to the page already shown reruns it with the link's parameters but leaves the address bar
    (and the history) alone; re-sending them makes the browser push the new URL, so links, reloads and the
    back button agree. When the address bar already shows them, the browser does nothing. On a run that
    changes the page they must not be sent: the browser writes them into the entry being left before it adds
    the new page's (measured: latent link on Search, then Back, gave search?width=..&latent=..).
    """
    last = st.session_state.get("_metasae_page")
    st.session_state["_metasae_page"] = page
    if last != page:
        return
    with contextlib.suppress(Exception):
        st.query_params.from_dict(st.query_params.to_dict())


# Streamlit answers Back / Forward by rerunning the entry's page with the query parameters of the page being left
# (measured in Chromium, Streamlit 1.67: latent 256/42 -> Back gave search?width=256&latent=42). Reloading the
# entry's own address shows the view the user saw there; every selection lives in the URL, so nothing is lost.
_HISTORY_JS = """<script>
(() => {
  const w = window.parent || window;
  if (w.__metasaeHistory) return;
  w.__metasaeHistory = true;
  // capture: runs before Streamlit's own popstate listener, which would rewrite the address first
  w.addEventListener("popstate", (e) => {
    e.stopImmediatePropagation();
    w.location.replace(w.location.href);
  }, {capture: true});
})();
</script>"""


def fix_history() -> None:
    """Make Back and Forward walk the visitor's own history across pages (see _HISTORY_JS)."""
    st.sidebar.html(_HISTORY_JS, unsafe_allow_javascript=True)


_REMEMBERED = "_metasae_page_params"


def remember_params(page: str) -> None:
    """Keep each page's last query parameters; a page opened with none (the sidebar's links) is switched to
    them, so going to Search and back to Latent returns to the latent the visitor was on."""
    mem = st.session_state.setdefault(_REMEMBERED, {})
    now = {k: v for k, v in st.query_params.to_dict().items() if k != "atlas"}
    if now:
        mem[page] = now
    elif mem.get(page) and page in PAGES:
        # a navigation, not a parameter write: written during a page change, parameters land on the history
        # entry being left
        st.switch_page(PAGES[page], query_params=link_params(**mem[page]))


def link_params(**values: Any) -> dict[str, str]:
    """Query parameters for a link: the given ones (None dropped) plus the chosen atlas when there are several."""
    out = {k: str(v) for k, v in values.items() if v is not None and v != ""}
    ctx = st.session_state.get(_CTX)
    if ctx is not None and len(ctx.sources) > 1 and ctx.source is not None:
        out["atlas"] = ctx.source.key
    return out


def bind(key: str, value: Any) -> None:
    """Show ``value`` (from the URL) in the widget ``key``; call before drawing the widget."""
    st.session_state[key] = value


def to_url(key: str, name: str, encode: Callable[[Any], Any] = str, default: Any = None,
           also: dict[str, Any] | None = None) -> Callable[[], None]:
    """An on_change callback that writes widget ``key``'s value to URL parameter ``name`` (default removes it)."""

    def callback() -> None:
        v = st.session_state.get(key)
        set_params(**{name: None if v is None or v == default else encode(v)})
        if also:
            set_params(**{k: (f() if callable(f) else f) for k, f in also.items()})

    return callback


def latent_picker(atlas: Atlas, prefix: str) -> tuple[int, int, str | None]:
    """Width and latent selectors bound to ``?width=&latent=``; returns (width, latent, why the URL was bad)."""
    try:
        width, latent = app_state.resolve_latent(atlas, param("width"), param("latent"))
        bad = None
    except BadInput as e:
        width, latent, bad = app_state.default_width(atlas), 0, str(e)
    wk, lk = f"{prefix}_width", f"{prefix}_latent"
    c1, c2, _ = st.columns([1, 1, 3])
    bind(wk, width)
    bind(lk, latent)
    c1.selectbox("Width", atlas.widths, key=wk, on_change=to_url(
        wk, "width", also={"latent": lambda: min(int(st.session_state[lk]), atlas.n_latents(st.session_state[wk]) - 1)}))
    c2.number_input("Latent", min_value=0, max_value=atlas.n_latents(width) - 1, step=1, key=lk,
                    on_change=to_url(lk, "latent", encode=int, also={"width": width}))
    return width, latent, bad


# --------------------------------------------------------------------------------------------- links and errors


def page_link(page: str, label: str, params: dict[str, Any] | None = None, icon: str | None = None,
              help: str | None = None) -> None:
    st.page_link(PAGES[page], label=label, query_params=link_params(**(params or {})), icon=icon, help=help)


def latent_link(width: int, latent: int, label: Any = None, extra: str = "") -> None:
    page_link("latent", latent_name(width, latent, label) + extra,
              {"width": int(width), "latent": int(latent)})


def meta_link(m: int, label: Any = None, extra: str = "") -> None:
    page_link("meta_latent", f"meta-latent {int(m)}" + (f" · {show_token(label)}" if label else "") + extra,
              {"meta": int(m)})


def with_links(df: pd.DataFrame) -> pd.DataFrame:
    """Adds a first column 'open' of relative latent-page URLs (LinkColumn cells) from the sae_width and latent
    columns; they carry the chosen atlas like every other link (link_params)."""
    df = df.copy()
    extra = "".join(f"&{k}={v}" for k, v in link_params().items())
    df.insert(0, "open", [f"latent?width={int(w)}&latent={int(i)}{extra}"
                          for w, i in zip(df["sae_width"], df["latent"], strict=True)])
    return df


LINK_COLUMN = {"open": st.column_config.LinkColumn("open", display_text="open ↗", width="small")}
# Per-latent effects and densities in the latent tables (Stitching, Search): small signed numbers, one format.
DELTA_COLUMNS = {c: st.column_config.NumberColumn(name, format="%.2e") for c, name in (
    ("density", "density"), ("delta_mse", "ΔMSE"), ("delta_ce", "ΔCE"), ("delta_ce_attr", "ΔCE attr"),
    ("group_delta_mse", "group ΔMSE"), ("group_delta_ce", "group ΔCE"))}


def table(df: pd.DataFrame, name: str, column_config: dict[str, Any] | None = None, **kw: Any) -> None:
    """A table with CSV and Parquet downloads of exactly what it shows (missing values drawn as —)."""
    st.dataframe(render.styled(df, column_config), hide_index=True, column_config=column_config, **kw)
    c1, c2, _ = st.columns([1, 1.4, 6])
    c1.download_button("CSV", data=lambda: render.to_csv(df), file_name=f"{name}.csv", mime="text/csv",
                       key=f"dl-csv-{name}", on_click="ignore", icon=":material/download:")
    c2.download_button("Parquet", data=lambda: render.to_parquet(df), file_name=f"{name}.parquet",
                       mime="application/vnd.apache.parquet", key=f"dl-pq-{name}", on_click="ignore",
                       icon=":material/download:")


def chips(tokens: list[Any] | None, limit: int = 10) -> None:
    st.markdown(render.token_chips(tokens, limit), unsafe_allow_html=True)


def show_error(e: BaseException) -> None:
    """A readable message for anything a page can hit: bad input, a broken atlas, or a bug (no traceback)."""
    if isinstance(e, BadInput):
        st.error(str(e))
    elif isinstance(e, UnknownLatentError):
        st.error(f"Not in this atlas: {e}")
    elif isinstance(e, AtlasError):
        st.error(f"The atlas cannot answer this: {e}")
    else:
        st.error(f"Something went wrong while drawing this part of the page ({type(e).__name__}: {e}). "
                 "The rest of the page still works; please report this with the URL.")


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Run one section of a page; an exception becomes an error message and the page goes on."""
    try:
        yield
    except Exception as e:  # st.stop / st.rerun / switch_page raise BaseException subclasses and pass through
        show_error(e)
