"""Plotly figures for the dashboard (every chart in the app is one of these; each is a pure function of data)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from metasae.views.latent import RadialGraph
from metasae.views.text import show_token

KIND_COLORS = {"novel": "#e4572e", "reconstruction": "#4c78a8", None: "#9e9e9e"}
ACTION_COLORS = {"start": "#333333", "add": KIND_COLORS["novel"], "swap": KIND_COLORS["reconstruction"],
                 "remove": "#8e44ad", "bias": "#7f8c8d"}
_LAYOUT = dict(margin=dict(l=10, r=10, t=40, b=10), template="plotly_white", height=360)


MAX_CURVE_POINTS = 1500  # a paper-scale pair has ~100k interpolation steps; the browser needs only this many
MAX_SCATTER_POINTS = 20_000


def thin(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """At most ``n`` rows, evenly spaced, first and last kept (for drawing long curves)."""
    if len(df) <= n:
        return df
    return df.iloc[np.unique(np.linspace(0, len(df) - 1, n).round().astype(int))]


def sample(df: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """At most ``n`` rows drawn at random (fixed seed, original order kept), for scatter plots."""
    if len(df) <= n:
        return df
    return df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), n, replace=False))]


def _fig(title: str, **layout: Any) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=dict(text=title, font=dict(size=15)), **{**_LAYOUT, **layout})
    return fig


def _short(text: Any, n: int = 28) -> str:
    s = show_token(text)
    return s if len(s) <= n else s[: n - 1] + "…"


def ladder_figure(ladder: pd.DataFrame, curves: dict[tuple[int, int], pd.DataFrame]) -> go.Figure:
    """MSE vs L0, one panel per neighbouring pair: the stitched path and its two rungs, labelled left (small)
    and right (large) so the labels never overlap even when the rungs share an L0 (BatchTopK ladders do)."""
    from plotly.subplots import make_subplots

    pairs = sorted(p for p, c in curves.items() if not c.empty)
    ok = ladder.dropna(subset=["l0", "mse"]).set_index("width")
    title = "Reconstruction MSE vs L0 — each pair's stitched path between its two rungs"
    if not pairs:
        fig = _fig(title, xaxis_title="L0 (active latents per token)", yaxis_title="MSE", height=420)
        fig.add_trace(go.Scatter(x=ok["l0"], y=ok["mse"], mode="markers+text", name="SAEs",
                                 text=[str(int(w)) for w in ok.index], textposition="top right",
                                 marker=dict(size=11, color="#222", symbol="diamond")))
        return fig
    fig = make_subplots(rows=1, cols=len(pairs), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[f"{a} → {b}" for a, b in pairs])
    fig.update_layout(title=dict(text=title, font=dict(size=15)), **{**_LAYOUT, "height": 420,
                                                                       "margin": dict(l=10, r=10, t=70, b=10)})
    palette = ["#4c78a8", "#e4572e", "#2a9d8f", "#8e44ad", "#f2a541", "#7f8c8d"]
    mses: list[float] = []
    for j, (small, large) in enumerate(pairs, start=1):
        c = thin(curves[(small, large)], MAX_CURVE_POINTS)
        fig.add_trace(go.Scatter(
            x=c["l0"], y=c["mse"], mode="lines", name=f"stitch {small}→{large}",
            line=dict(width=1.5, color=palette[(j - 1) % len(palette)]),
            customdata=np.stack([c["step"], c["action"].astype(str)], axis=1),
            hovertemplate="step %{customdata[0]} (%{customdata[1]})<br>L0 %{x:.3g}<br>MSE %{y:.4g}<extra></extra>"),
            row=1, col=j)
        mses += [float(v) for v in pd.to_numeric(c["mse"], errors="coerce").dropna()]
        rungs = [w for w in (small, large) if w in ok.index]
        if rungs:
            fig.add_trace(go.Scatter(
                x=[ok.loc[w, "l0"] for w in rungs], y=[ok.loc[w, "mse"] for w in rungs], mode="markers+text",
                name="SAEs", legendgroup="SAEs", showlegend=j == 1, text=[str(int(w)) for w in rungs],
                textposition=["middle left" if w == small else "middle right" for w in rungs],
                marker=dict(size=10, color="#222", symbol="diamond"), cliponaxis=False,
                hovertemplate="width %{text}<br>L0 %{x:.3g}<br>MSE %{y:.4g}<extra></extra>"), row=1, col=j)
            mses += [float(ok.loc[w, "mse"]) for w in rungs]
        fig.update_xaxes(title_text="L0", row=1, col=j)
    fig.update_yaxes(title_text="MSE", row=1, col=1)
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    if mses and min(mses) > 0:  # a stitched path can overshoot the SAEs by 10x: log keeps both readable
        fig.update_yaxes(type="log")
    return fig


def novel_fraction_figure(pairs: pd.DataFrame, paper: float = 0.35, seed_mismatch: float | None = None) -> go.Figure:
    """Novel share of the larger SAE per pair: the cosine proxy (all, live) and the paper's functional test
    where the atlas records them, beside the paper's ~35% and the same-width seed baseline."""
    fig = _fig("Novel latents per pair (larger SAE)", yaxis_title="fraction novel", yaxis_range=[0, 1.08],
               barmode="group")
    series = [("novel_frac", "cosine proxy, all latents", KIND_COLORS["novel"]),
              ("novel_frac_cos_live", "cosine proxy, live latents", "#f2a541"),
              ("novel_frac_functional", "functional (insertion lowers MSE)", "#2a9d8f")]
    for col, name, color in series:
        if len(pairs) and col in pairs and pd.to_numeric(pairs[col], errors="coerce").notna().any():
            y = pd.to_numeric(pairs[col], errors="coerce")
            fig.add_trace(go.Bar(x=pairs["pair"], y=y, marker_color=color, name=name,
                                 text=[f"{v:.0%}" if v == v else "" for v in y], textposition="inside",
                                 insidetextanchor="middle", textfont=dict(color="white"),
                                 hovertemplate="%{x}: %{y:.1%} " + name + "<extra></extra>"))
    fig.add_hline(y=paper, line_dash="dot", line_color="#555",
                  annotation_text=f"paper (GPT-2): ~{paper:.0%}", annotation_position="top left")
    if seed_mismatch is not None:
        fig.add_hline(y=seed_mismatch, line_dash="dash", line_color="#8e44ad",
                      annotation_text=f"two seeds, same width: {seed_mismatch:.0%} unmatched",
                      annotation_position="top right", annotation_yshift=14)
    fig.update_xaxes(type="category", title="pair (small→large)")
    fig.update_layout(legend=dict(orientation="h", y=-0.3))
    return fig


def max_cos_figure(cos: dict[int, np.ndarray], threshold: float) -> go.Figure:
    """Histogram of each latent's max cosine with the next smaller SAE; right of the line = reconstruction."""
    fig = _fig("Max cosine with the next smaller SAE", xaxis_title="max decoder cosine",
               yaxis_title="latents", barmode="overlay")
    for w, c in sorted(cos.items()):
        fig.add_trace(go.Histogram(x=c, name=f"width {w}", opacity=0.55, xbins=dict(start=0, end=1.0001, size=0.025),
                                   hovertemplate=f"width {w}<br>cos %{{x}}<br>%{{y}} latents<extra></extra>"))
    fig.add_vline(x=threshold, line_dash="dash", line_color="#333",
                  annotation_text=f"threshold {threshold:g}: novel ← | → reconstruction",
                  annotation_position="top left")
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return fig


def histogram_figure(counts: list[int] | None, edges: list[float] | None, title: str = "Activation histogram",
                     xaxis: str = "activation") -> go.Figure:
    """A stored histogram (counts per bin, bin edges) as a step area; log x when the bins are log-spaced."""
    fig = _fig(title, xaxis_title=xaxis, yaxis_title="count", height=300)
    if not counts or not edges or len(edges) != len(counts) + 1:
        fig.add_annotation(text="no histogram stored", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        return fig
    e = np.asarray(edges, dtype=float)
    c = np.asarray(counts, dtype=float)
    fig.add_trace(go.Scatter(x=e, y=np.r_[c, c[-1:]], mode="lines", line_shape="hv", fill="tozeroy",
                             line=dict(color="#ff8c00"), hovertemplate="from %{x:.3g}: %{y:,} <extra></extra>"))
    pos = e[e > 0]
    if len(pos) == len(e) and len(e) > 2:
        r = e[1:] / e[:-1]
        if np.allclose(r, r[0], rtol=1e-3) and r[0] > 1.05:
            fig.update_xaxes(type="log")
    return fig


def decomposition_figure(dec: pd.DataFrame, title: str = "Meta-latent decomposition") -> go.Figure:
    """Horizontal bars: the latent's meta-latents by weight (largest on top)."""
    d = dec.sort_values("weight")
    fig = _fig(title, xaxis_title="weight", height=max(220, 46 * len(d) + 80))
    fig.add_trace(go.Bar(
        x=d["weight"], y=[f"{int(m)} · {_short(lab)}" for m, lab in zip(d["meta_latent"], d["label"], strict=True)],
        orientation="h", marker_color="#6a5acd", text=[f"{w:.3f}" for w in d["weight"]], textposition="auto",
        hovertemplate="%{y}<br>weight %{x:.4f}<extra></extra>"))
    fig.update_yaxes(type="category")
    return fig


def radial_figure(graph: RadialGraph) -> go.Figure:
    """The latent -> meta-latents -> other latents graph; each node carries its index as customdata."""
    n = graph.nodes
    fig = _fig("", height=520, showlegend=True, margin=dict(l=5, r=5, t=10, b=5))
    for primary, style in ((False, dict(color="rgba(150,150,150,0.25)", width=0.8, dash="dot")),
                           (True, dict(color="#b8b8b8", width=1.4))):
        ex: list[Any] = []
        ey: list[Any] = []
        for a, b, _w, p in graph.edges:
            if p == primary:
                ex += [n.at[a, "x"], n.at[b, "x"], None]
                ey += [n.at[a, "y"], n.at[b, "y"], None]
        if ex:
            fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=style, hoverinfo="skip", showlegend=False))
    styles = {"center": ("this latent", "#111111", 26, "circle"), "meta": ("meta-latent", "#6a5acd", 20, "diamond"),
              "latent": ("other latent", "#ff8c00", 14, "circle")}
    for kind, (name, color, size, symbol) in styles.items():
        sub = n[n["kind"] == kind]
        if sub.empty:
            continue
        if kind == "meta":
            text = [f"m{int(m)} {_short(lab, 18)}" for m, lab in zip(sub["meta_latent"], sub["label"], strict=True)]
            hover = [f"meta-latent {int(m)}: {show_token(lab)}<br>weight {w:.3f}<br>click to open"
                     for m, lab, w in zip(sub["meta_latent"], sub["label"], sub["weight"], strict=True)]
        else:
            flags = sub["flag"] if "flag" in sub else pd.Series([""] * len(sub), index=sub.index)
            text = [f"{int(w)}/{int(i)}" + (f" [{f}]" if f else "")
                    for w, i, f in zip(sub["sae_width"], sub["latent"], flags, strict=True)]
            hover = [f"latent {int(w)}/{int(i)}: {show_token(lab)}" + (f" ({f})" if f else "")
                     + ("" if kind == "center" else f"<br>weight {wt:.3f}<br>click to open")
                     for w, i, lab, wt, f in zip(sub["sae_width"], sub["latent"], sub["label"], sub["weight"], flags,
                                                 strict=True)]
        fig.add_trace(go.Scatter(
            x=sub["x"], y=sub["y"], mode="markers+text", name=name, text=text,
            textposition="bottom center" if kind != "center" else "top center",
            marker=dict(size=size, color=color, symbol=symbol, line=dict(width=1, color="white")),
            customdata=sub.index.to_numpy(), hovertext=hover, hoverinfo="text"))
    fig.update_xaxes(visible=False, range=[-2.9, 2.9])
    fig.update_yaxes(visible=False, range=[-2.7, 2.7], scaleanchor="x")
    fig.update_layout(legend=dict(orientation="h", y=1.02, x=0), dragmode=False, clickmode="event+select")
    return fig


def stitch_path_figure(curve: pd.DataFrame, small: int, large: int) -> go.Figure:
    """One pair's interpolation: MSE vs L0, a marker per step coloured by its action (add / swap ...)."""
    fig = _fig(f"Stitching {small} → {large}: MSE vs L0, one step per novel latent added or group swapped",
               xaxis_title="L0", yaxis_title="MSE", height=400)
    if curve.empty:
        fig.add_annotation(text="no curve stored for this pair", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
        return fig
    curve = thin(curve, MAX_CURVE_POINTS)
    fig.add_trace(go.Scatter(x=curve["l0"], y=curve["mse"], mode="lines", line=dict(color="#bbb"),
                             hoverinfo="skip", showlegend=False))
    for action, sub in curve.groupby("action", sort=False):
        fig.add_trace(go.Scatter(
            x=sub["l0"], y=sub["mse"], mode="markers", name=str(action),
            marker=dict(size=6, color=ACTION_COLORS.get(str(action), "#999")),
            customdata=np.stack([sub["step"], sub["latent"].astype("Float64").fillna(-1),
                                 sub["group"].astype("Float64").fillna(-1)], axis=1),
            hovertemplate="step %{customdata[0]}<br>L0 %{x:.3g}, MSE %{y:.4g}<extra>" + str(action) + "</extra>"))
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    return fig


def fresh_curve_figure(stored: pd.DataFrame, fresh: pd.DataFrame, small: int, large: int) -> go.Figure:
    """The stored interpolation curve and a fresh one from the backend, MSE vs L0."""
    fig = _fig(f"Stitching {small} → {large}: stored vs fresh evaluation", xaxis_title="L0", yaxis_title="MSE",
               height=380)
    for name, c, color in (("stored", stored, "#b0b0b0"), ("fresh", fresh, "#2a9d8f")):
        c = thin(c, MAX_CURVE_POINTS)
        if len(c):
            fig.add_trace(go.Scatter(x=c["l0"], y=c["mse"], mode="lines+markers", name=name, marker=dict(size=4),
                                     line=dict(color=color)))
    fig.update_layout(legend=dict(orientation="h", y=1.08))
    return fig


def stitch_ce_figure(curve: pd.DataFrame, small: int, large: int) -> go.Figure:
    """CE loss along the interpolation (measured on a subset of steps)."""
    fig = _fig(f"Next-token CE loss along {small} → {large}", xaxis_title="step", yaxis_title="CE loss", height=320)
    c = thin(curve.dropna(subset=["ce_loss"]), MAX_CURVE_POINTS) if "ce_loss" in curve else curve.iloc[0:0]
    if c.empty:
        fig.add_annotation(text="CE loss was not measured on this curve", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
        return fig
    fig.add_trace(go.Scatter(x=c["step"], y=c["ce_loss"], mode="lines+markers", line=dict(color="#2a9d8f"),
                             hovertemplate="step %{x}<br>CE %{y:.4f}<extra></extra>", name="CE loss"))
    return fig


def delta_scatter(table: pd.DataFrame, x: str = "delta_mse", y: str = "delta_ce",
                  title: str = "ΔMSE vs ΔCE per latent") -> go.Figure:
    """Per-latent effects, coloured by kind."""
    names = {"delta_mse": "ΔMSE", "delta_ce": "ΔCE (exact)", "delta_ce_attr": "ΔCE (attribution)"}
    fig = _fig(title, xaxis_title=names.get(x, x), yaxis_title=names.get(y, y), height=380)
    if x not in table or y not in table:
        return fig
    if len(table) > MAX_SCATTER_POINTS:
        fig.update_layout(title=dict(text=f"{title} ({MAX_SCATTER_POINTS:,} of {len(table):,} latents)"))
        table = sample(table, MAX_SCATTER_POINTS)
    for kind, sub in table.groupby(table["kind"].fillna("none"), sort=True):
        sub = sub.dropna(subset=[x, y])
        if sub.empty:
            continue
        fig.add_trace(go.Scattergl(
            x=sub[x], y=sub[y], mode="markers", name=str(kind), marker=dict(size=5, opacity=0.7,
                                                                             color=KIND_COLORS.get(kind, "#999")),
            customdata=sub["latent"], text=[_short(t, 40) for t in sub["label"]],
            hovertemplate="latent %{customdata}: %{text}<br>%{x:.3g}, %{y:.3g}<extra></extra>"))
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    return fig


def members_figure(per_width: pd.DataFrame) -> go.Figure:
    """Members of a meta-latent per SAE width."""
    fig = _fig("Member latents per width", xaxis_title="SAE width", yaxis_title="members", height=300)
    fig.add_trace(go.Bar(x=[str(int(w)) for w in per_width["sae_width"]], y=per_width["members"],
                         marker_color="#6a5acd", customdata=per_width["mean_weight"],
                         hovertemplate="width %{x}: %{y} members<br>mean weight %{customdata:.3f}<extra></extra>"))
    fig.update_xaxes(type="category")
    return fig


def cooccur_figure(co: pd.DataFrame) -> go.Figure:
    """Meta-latents that share latents with this one (fraction of its members)."""
    d = co.sort_values("fraction")
    fig = _fig("Co-occurring meta-latents", xaxis_title="fraction of members that also hold it",
               height=max(240, 30 * len(d) + 80))
    fig.add_trace(go.Bar(x=d["fraction"], y=[f"{int(m)} · {_short(lab)}" for m, lab in
                                              zip(d["meta_latent"], d["label"], strict=True)],
                         orientation="h", marker_color="#9b8fe0", customdata=d["count"],
                         hovertemplate="%{y}<br>%{customdata} shared latents (%{x:.1%})<extra></extra>"))
    fig.update_yaxes(type="category")
    return fig


def compare_figure(cmp: pd.DataFrame, stored_name: str = "stored", live_name: str = "live") -> go.Figure:
    """Grouped bars: stored vs live weight per meta-latent."""
    labels = [f"{int(m)} · {_short(lab, 22)}" for m, lab in zip(cmp["meta_latent"], cmp["label"], strict=True)]
    fig = _fig("Meta-SAE decomposition: stored vs computed now", yaxis_title="weight", barmode="group", height=360)
    fig.add_trace(go.Bar(x=labels, y=cmp["stored"], name=stored_name, marker_color="#b0b0b0"))
    fig.add_trace(go.Bar(x=labels, y=cmp["live"], name=live_name, marker_color="#6a5acd"))
    fig.update_xaxes(type="category", tickangle=-30)
    fig.update_layout(legend=dict(orientation="h", y=1.08))
    return fig


def token_latent_heatmap(acts: pd.DataFrame, max_latents: int = 20) -> go.Figure:
    """Tokens (x) by the latents most active anywhere in the text (y), coloured by activation."""
    fig = _fig("Top latents per token", height=420)
    if acts.empty:
        return fig
    top = acts.groupby("latent")["activation"].max().sort_values(ascending=False).head(max_latents).index.tolist()
    n_tok = int(acts["position"].max()) + 1
    tokens = acts.drop_duplicates("position").set_index("position")["token"].reindex(range(n_tok)).fillna("")
    z = np.full((len(top), n_tok), np.nan)
    row = {lat: r for r, lat in enumerate(top)}
    for p, lat, a in zip(acts["position"], acts["latent"], acts["activation"], strict=True):
        if lat in row:
            z[row[lat], int(p)] = a
    labels = acts.drop_duplicates("latent").set_index("latent")["label"]
    fig.add_trace(go.Heatmap(
        z=z, x=[f"{p}:{_short(t, 12)}" for p, t in enumerate(tokens)],
        y=[f"{lat} · {_short(labels.get(lat, ''), 24)}" for lat in top], colorscale="Oranges",
        hovertemplate="%{x}<br>latent %{y}<br>activation %{z:.3g}<extra></extra>", hoverongaps=False))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45)
    return fig


def finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def training_curves_figure(curves: pd.DataFrame) -> go.Figure:
    """Training-batch FVU against training tokens, one line per rung (the atlas's training_curves table)."""
    fig = go.Figure()
    for w, c in curves.groupby("sae_width", sort=True):
        fig.add_trace(go.Scatter(x=c["tokens"], y=c["fvu"], mode="lines", name=f"width {w}"))
    fig.update_layout(title="FVU of the training batches vs training tokens", xaxis_title="training tokens",
                      yaxis_title="FVU (batch)", yaxis_rangemode="tozero", template="plotly_white",
                      legend_title_text="rung")
    return fig
