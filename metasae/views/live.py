"""Live page: a composed direction decomposed now by the meta-SAE next to the stored decompositions, and the
backend's per-token activations of a text (filtered, with its loading progress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from metasae.app_state import BadInput, Term
from metasae.atlas import Atlas
from metasae.views.badges import DENSE, with_badges
from metasae.views.meta_latent import meta_label
from metasae.views.text import show_token


def compose(terms: list[Term], decoders: dict[int, np.ndarray]) -> np.ndarray:
    """Σ coef · decoder row for the terms (``decoders`` maps width -> decoder rows)."""
    d = next(iter(decoders.values())).shape[1]
    v = np.zeros(d, dtype=np.float64)
    for t in terms:
        v += t.coef * decoders[t.width][t.latent].astype(np.float64)
    return v


def encode_live(atlas: Atlas, meta_sae: Any, vector: np.ndarray) -> pd.DataFrame:
    """Meta-SAE decomposition of one vector, computed now: DataFrame[meta_latent, weight, label]."""
    import torch

    from metasae.meta import decompose
    from metasae.sae import SaeError

    try:
        w, i = decompose(meta_sae, torch.as_tensor(np.asarray(vector, dtype=np.float32)))
    except SaeError as e:
        raise BadInput(str(e)) from None
    weights, idx = w[0].numpy(), i[0].numpy()
    keep = weights > 0
    ids = idx[keep].astype(int)
    return pd.DataFrame({"meta_latent": ids, "weight": weights[keep].astype(float),
                         "label": [meta_label(atlas, m) for m in ids]})


def expected_decomposition(atlas: Atlas, terms: list[Term]) -> pd.DataFrame:
    """Σ coef · stored decomposition of each term: what a linear meta-SAE would answer for the composition."""
    acc: dict[int, float] = {}
    for t in terms:
        dec = atlas.decomposition(t.width, t.latent)
        for m, w in zip(dec["meta_latent"], dec["weight"], strict=True):
            acc[int(m)] = acc.get(int(m), 0.0) + t.coef * float(w)
    items = sorted(acc.items(), key=lambda kv: -kv[1])
    return pd.DataFrame({"meta_latent": [m for m, _ in items], "weight": [w for _, w in items],
                         "label": [meta_label(atlas, m) for m, _ in items]})


def compare(stored: pd.DataFrame, live: pd.DataFrame) -> pd.DataFrame:
    """Outer join of two decompositions on meta_latent: label, stored, live, difference (live - stored)."""
    a = stored[["meta_latent", "weight", "label"]].rename(columns={"weight": "stored"})
    b = live[["meta_latent", "weight", "label"]].rename(columns={"weight": "live"})
    df = a.merge(b, on="meta_latent", how="outer", suffixes=("", "_live"))
    df["label"] = df["label"].fillna(df.pop("label_live"))
    df[["stored", "live"]] = df[["stored", "live"]].astype(float).fillna(0.0)
    df["difference"] = df["live"] - df["stored"]
    df["meta_latent"] = df["meta_latent"].astype(int)
    df = df[["meta_latent", "label", "stored", "live", "difference"]]
    return df.sort_values(["live", "stored"], ascending=False).reset_index(drop=True)


LIVE_TOP_K = 64  # latents asked per token: all that fire for a k=32 TopK SAE, so filtering still leaves a top 5


def activations_table(result: dict[str, Any], density: pd.Series | None = None) -> pd.DataFrame:
    """Backend ``activations`` answer as rows (position, token, rank, latent, flag, activation, label, density);
    ``density`` (indexed by latent) fills the density and the dead/dense flag."""
    rows = []
    for pos, (tok, top) in enumerate(zip(result.get("tokens") or [], result.get("top") or [], strict=False)):
        for rank, item in enumerate(top or []):
            rows.append({"position": pos, "token": show_token(tok), "rank": rank, "latent": int(item["latent"]),
                         "activation": float(item["activation"]), "label": show_token(item.get("label"))})
    df = pd.DataFrame(rows, columns=["position", "token", "rank", "latent", "activation", "label"])
    df["density"] = (df["latent"].map(density) if density is not None else pd.Series(np.nan, index=df.index)
                     ).astype(float)
    return with_badges(df)


@dataclass
class LiveTokens:
    table: pd.DataFrame  # the rows shown: top latents per token after the filters
    hidden: str | None  # what the filters took out, in words


def live_top(acts: pd.DataFrame, dense: float | None = DENSE, hide_first: bool = True, top: int = 5) -> LiveTokens:
    """Per token, its ``top`` strongest latents after hiding dense latents (density above ``dense``; None keeps
    them) and the first token (an attention sink on which thousands of latents fire)."""
    keep = pd.Series(True, index=acts.index)
    parts = []
    if dense is not None:
        is_dense = acts["density"].fillna(0) > dense
        keep &= ~is_dense
        n_lat = acts.loc[is_dense, "latent"].nunique()
        if n_lat:
            parts.append(f"{n_lat} dense latent{'s' if n_lat != 1 else ''} (density above {dense:g}; "
                         f"{int(is_dense.sum())} activations)")
    if hide_first and len(acts) and (acts["position"] == 0).any():
        keep &= acts["position"] != 0
        parts.append(f"the first token ({show_token(acts.loc[acts['position'] == 0, 'token'].iloc[0])!r}, "
                     "where the model parks attention and many latents fire)")
    out = acts[keep].sort_values(["position", "activation"], ascending=[True, False])
    out = out.groupby("position", sort=True).head(top).copy()
    out["rank"] = out.groupby("position").cumcount()
    return LiveTokens(out.reset_index(drop=True), ("Hidden: " + " and ".join(parts) + ".") if parts else None)


def latent_over_text(result: dict[str, Any], latent: int) -> pd.DataFrame:
    """How much one latent fires on every token of a backend ``activations`` answer (0 where it is not among
    the token's returned latents): DataFrame[position, token, activation]."""
    rows = []
    for pos, (tok, top) in enumerate(zip(result.get("tokens") or [], result.get("top") or [], strict=False)):
        a = next((float(x["activation"]) for x in top or [] if int(x["latent"]) == int(latent)), 0.0)
        rows.append({"position": pos, "token": tok, "activation": a})
    return pd.DataFrame(rows, columns=["position", "token", "activation"])


def load_progress(health: dict[str, Any], widths: list[int]) -> tuple[float, str] | None:
    """(fraction, 'loading model 3/5 …') while the backend is still loading what text → latents needs; None
    once the model is loaded."""
    if "loaded" not in health:  # a backend that does not report loading: ask it directly
        return None
    loaded = health.get("loaded") or {}
    if health.get("status") == "error" or loaded.get("model"):
        return None
    if not health.get("loading"):
        # nothing is loading (a backend started without preloading): it loads on the first request, so ask it
        # rather than wait for a background load that will never come
        return None
    have = ["meta-SAE"] if loaded.get("meta_sae") else []
    have += [f"SAE {w}" for w in loaded.get("saes") or []]
    total = len(widths) + 2  # meta-SAE, every SAE, the language model (the backend's preload order)
    now = ", ".join(health.get("loading") or []) or "waiting to start"
    return (len(have) / total, f"Loading in the background {len(have)}/{total}: now {now}"
            + (f" (ready: {', '.join(have)})" if have else "")
            + ". The rest of the page works meanwhile.")
