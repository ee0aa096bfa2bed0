"""Neighbours across the whole ladder by decoder cosine: a meta-latent's nearest latents in every width, and a
latent's family tree (its nearest latents in each smaller and larger width).

All widths share d_model, so one direction is compared with every decoder row of every width: one (n, d) @ (d,)
product per width on cached unit decoders (the bundled ladder, 8,640 rows x 576, answers in a few ms). Unit
decoders are cached per (atlas folder, width, weights file hash), so a rebuilt atlas is never served stale rows.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd

from metasae.atlas import Atlas

_CACHE: dict[tuple[str, int, str], np.ndarray] = {}
_LOCK = threading.Lock()
_MAX_CACHED = 16


def unit_rows(W: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, float32 (a zero row stays zero)."""
    W = np.asarray(W, dtype=np.float32)
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def unit_decoder(atlas: Atlas, width: int) -> np.ndarray:
    """Unit decoder rows (width, d_model) of one SAE of the atlas, loaded once per process."""
    from metasae.weights import load_decoder

    digest = str(atlas.manifest.files.get(f"saes/{width}/sae_weights.safetensors", ""))
    key = (str(atlas.path), int(width), digest)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    rows = unit_rows(load_decoder(atlas, width))
    rows.setflags(write=False)
    with _LOCK:
        if len(_CACHE) >= _MAX_CACHED:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = rows
    return rows


def meta_decoder(atlas: Atlas) -> np.ndarray:
    """The meta-SAE's decoder rows (n_meta, d_model), loaded once per process."""
    from metasae.weights import load_meta_sae

    digest = str(atlas.manifest.files.get("meta_sae/sae_weights.safetensors", ""))
    key = (str(atlas.path), -1, digest)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is None:
        hit = load_meta_sae(atlas).W_dec.float().numpy().copy()
        with _LOCK:
            _CACHE[key] = hit
    return hit


def unit_decoders(atlas: Atlas) -> dict[int, np.ndarray]:
    """Unit decoder rows of every width of the atlas."""
    return {w: unit_decoder(atlas, w) for w in atlas.widths}


def _top(cos: np.ndarray, k: int, exclude: int | None = None) -> np.ndarray:
    """Indices of the k largest values, largest first (ties: lower index first); `exclude` left out."""
    if exclude is not None:
        cos = cos.copy()
        cos[exclude] = -np.inf
    k = min(k, len(cos) - (exclude is not None))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(-cos, k - 1)[:k]
    return idx[np.lexsort((idx, -cos[idx]))]


def nearest(units: dict[int, np.ndarray], direction: np.ndarray, k: int = 5,
            skip: tuple[int, int] | None = None) -> pd.DataFrame:
    """The `k` latents of each width nearest to `direction` by cosine.

    DataFrame[sae_width, latent, cos, rank], widths ascending, cosine descending within a width. `skip`
    = (width, latent) leaves one latent out (the latent itself, when asking for a latent's neighbours).
    """
    u = unit_rows(np.asarray(direction, dtype=np.float32)[None])[0]
    frames = []
    for w in sorted(units):
        cos = units[w] @ u
        idx = _top(cos, k, skip[1] if skip is not None and skip[0] == w else None)
        frames.append(pd.DataFrame({"sae_width": w, "latent": idx.astype(np.int64), "cos": cos[idx].astype(float),
                                    "rank": np.arange(len(idx))}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["sae_width", "latent", "cos",
                                                                                     "rank"])


def best_width(near: pd.DataFrame) -> dict[str, Any] | None:
    """The width whose nearest latent matches best: {sae_width, latent, cos}, or None when empty."""
    if near.empty:
        return None
    top = near.sort_values(["cos", "sae_width"], ascending=[False, True]).iloc[0]
    return {"sae_width": int(top.sae_width), "latent": int(top.latent), "cos": float(top.cos)}


def meta_neighbours(units: dict[int, np.ndarray], meta_decoder: np.ndarray, m: int,
                    k: int = 5) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """(nearest latents of every width to meta-latent `m`'s decoder direction, the best-matched width)."""
    near = nearest(units, np.asarray(meta_decoder)[m], k)
    return near, best_width(near)


def family_tree(units: dict[int, np.ndarray], width: int, latent: int, k: int = 3) -> pd.DataFrame:
    """A latent's family across the ladder: its `k` nearest latents in every other width, as a tree.

    Each node has `cos` (to the root latent) and a parent: the root for the adjacent widths, else the node of the
    adjacent width nearer the root with the highest cosine to it (`parent_cos`). `step` is the number of rungs
    from the root (negative: smaller widths). DataFrame[sae_width, latent, cos, rank, step, parent_width,
    parent_latent, parent_cos]; the root is the first row (step 0, no parent).
    """
    widths = sorted(units)
    if width not in units:
        raise KeyError(f"width {width} is not in the ladder {widths}")
    root = units[width][latent]
    i0 = widths.index(width)
    rows: list[dict[str, Any]] = [{"sae_width": width, "latent": int(latent), "cos": 1.0, "rank": 0, "step": 0,
                                   "parent_width": None, "parent_latent": None, "parent_cos": None}]
    for direction in (-1, 1):
        prev_w, prev = width, np.array([latent])
        i = i0 + direction
        while 0 <= i < len(widths):
            w = widths[i]
            cos = units[w] @ root
            idx = _top(cos, k)
            to_prev = units[w][idx] @ units[prev_w][prev].T  # (k, k_prev)
            best = to_prev.argmax(axis=1)
            for r, (j, b) in enumerate(zip(idx, best, strict=True)):
                rows.append({"sae_width": w, "latent": int(j), "cos": float(cos[j]), "rank": r, "step": i - i0,
                             "parent_width": prev_w, "parent_latent": int(prev[b]),
                             "parent_cos": float(to_prev[r, b])})
            prev_w, prev = w, idx
            i += direction
    out = pd.DataFrame(rows)
    return out.astype({"parent_width": "Int64", "parent_latent": "Int64", "parent_cos": "Float64"})


def with_labels(atlas: Atlas, df: pd.DataFrame) -> pd.DataFrame:
    """Adds the label and density of each (sae_width, latent) row (for tables and flags)."""
    out = df.copy()
    labels, dens = [], []
    for w, i in zip(out["sae_width"], out["latent"], strict=True):
        row = atlas.latent(int(w), int(i))
        labels.append(row.get("label"))
        dens.append(row.get("density"))
    out.insert(out.columns.get_loc("latent") + 1, "label", labels)
    out["density"] = dens
    return out


def latent_family(atlas: Atlas, width: int, latent: int, k: int = 3) -> pd.DataFrame:
    """`family_tree` of one latent of the atlas, with labels and densities."""
    return with_labels(atlas, family_tree(unit_decoders(atlas), width, latent, k))


def meta_family(atlas: Atlas, m: int, k: int = 5) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """`meta_neighbours` of meta-latent `m` of the atlas (labels and densities added), and the best width."""
    near, best = meta_neighbours(unit_decoders(atlas), meta_decoder(atlas), m, k)
    return with_labels(atlas, near), best


def tree_figure(tree: pd.DataFrame, title: str = "Family across the ladder") -> Any:
    """The family tree drawn with widths as rows (smallest on top) and cosine-to-root as colour."""
    import plotly.graph_objects as go

    pos: dict[tuple[int, int], tuple[float, float]] = {}
    for step, grp in tree.groupby("step", sort=True):
        n = len(grp)
        for j, r in enumerate(grp.itertuples(index=False)):
            pos[(int(r.sae_width), int(r.latent))] = ((j - (n - 1) / 2), -float(step))
    ex, ey = [], []
    for r in tree.itertuples(index=False):
        if pd.isna(r.parent_width):
            continue
        (x0, y0), (x1, y1) = pos[(int(r.parent_width), int(r.parent_latent))], pos[(int(r.sae_width), int(r.latent))]
        ex += [x0, x1, None]
        ey += [y0, y1, None]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line={"color": "#bbb", "width": 1}, hoverinfo="skip",
                             showlegend=False))
    xs = [pos[(int(w), int(i))][0] for w, i in zip(tree.sae_width, tree.latent, strict=True)]
    ys = [pos[(int(w), int(i))][1] for w, i in zip(tree.sae_width, tree.latent, strict=True)]
    labels = tree["label"] if "label" in tree else [""] * len(tree)
    text = [f"{int(w)}/{int(i)}" for w, i in zip(tree.sae_width, tree.latent, strict=True)]
    hover = [f"width {int(w)}, latent {int(i)}<br>{lab or ''}<br>cos to root {c:.3f}"
             + ("" if pd.isna(pc) else f"<br>cos to parent {pc:.3f}")
             for w, i, lab, c, pc in zip(tree.sae_width, tree.latent, labels, tree.cos, tree.parent_cos, strict=True)]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=text, textposition="top center",
                             hovertext=hover, hoverinfo="text", customdata=list(range(len(tree))), showlegend=False,
                             marker={"size": 16, "color": tree["cos"], "colorscale": "Viridis", "cmin": 0, "cmax": 1,
                                     "colorbar": {"title": "cos"}, "line": {"width": 1, "color": "#333"}}))
    steps = sorted(tree["step"].unique())
    widths = [int(tree.loc[tree.step == s, "sae_width"].iloc[0]) for s in steps]
    fig.update_layout(title=title, height=120 + 90 * len(steps), margin={"l": 60, "r": 20, "t": 50, "b": 20},
                      xaxis={"visible": False},
                      yaxis={"tickvals": [-float(s) for s in steps], "ticktext": [f"width {w}" for w in widths],
                             "range": [-max(steps) - 0.6, -min(steps) + 0.6]})
    return fig


def per_width_figure(near: pd.DataFrame, title: str = "Best decoder cosine in each width") -> Any:
    """Bars: the highest cosine reached in each width (the nearest latent's id on the bar)."""
    import plotly.graph_objects as go

    top = near[near["rank"] == 0]
    fig = go.Figure(go.Bar(x=[str(int(w)) for w in top.sae_width], y=top.cos,
                           text=[f"latent {int(i)}" for i in top.latent], textposition="outside",
                           hovertemplate="width %{x}: cos %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, height=300, xaxis={"title": "width", "type": "category"},
                      yaxis={"title": "cos", "range": [0, 1.1]},
                      margin={"l": 50, "r": 10, "t": 50, "b": 40})
    return fig
