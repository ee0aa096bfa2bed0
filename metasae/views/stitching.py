"""Stitching page: one pair's latents with kinds and ΔMSE/ΔCE, its summary, and a fresh backend evaluation
lined up with what the atlas stores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from metasae.app_state import BadInput
from metasae.atlas import Atlas, StitchPair
from metasae.views.text import fmt, show_token

STITCH_COLUMNS = ["latent", "label", "kind", "nearest_smaller", "nearest_smaller_cos", "group_id", "delta_mse",
                  "delta_ce", "delta_ce_attr", "group_delta_mse", "group_delta_ce", "density"]


def stitching_table(atlas: Atlas, small: int, large: int, kind: str | None = None) -> pd.DataFrame:
    """The large SAE's latents with their kind against ``small``, swap group and ΔMSE/ΔCE."""
    if atlas.widths.index(large) != atlas.widths.index(small) + 1:
        raise BadInput(f"The table needs neighbouring widths; {small} and {large} are not.")
    df = atlas.latents_table(large, [c for c in STITCH_COLUMNS if c in atlas.columns("latents")])
    if kind:
        df = df[df["kind"] == kind]
    df = df.reset_index(drop=True)
    df["label"] = df["label"].map(show_token)
    return df


def stitch_pair(atlas: Atlas, small: int, large: int) -> StitchPair | None:
    """The build's record of one (small, large) pair, None when the manifest has none."""
    return next((p for p in atlas.manifest.stitching.pairs if (p.small, p.large) == (small, large)), None)


def pair_summary(atlas: Atlas, small: int, large: int) -> dict[str, Any]:
    """One pair: the manifest's record (novel fraction, groups, actions, attribution Spearman ...), with what it
    lacks computed from the tables."""
    out: dict[str, Any] = {"small": small, "large": large}
    stored = stitch_pair(atlas, small, large)
    if stored is not None:
        out.update(stored.model_dump(exclude_unset=True))
    cols: list[str] = [c for c in ("kind", "group_id", "delta_ce", "delta_ce_attr") if c in atlas.columns("latents")]
    lat = atlas.latents_table(large, cols)
    if out.get("novel_frac") is None:
        out["novel_frac"] = float((lat["kind"] == "novel").mean()) if len(lat) else None
    if out.get("n_groups") is None and "group_id" in lat:
        out["n_groups"] = int(lat["group_id"].dropna().nunique())
    curve = atlas.stitching_curve(small, large)
    for action in ("add", "swap", "remove"):
        if out.get(f"n_{action}") is None and len(curve):
            out[f"n_{action}"] = int((curve["action"] == action).sum())
    if out.get("attr_spearman") is None and {"delta_ce", "delta_ce_attr"} <= set(lat.columns):
        both = lat[["delta_ce", "delta_ce_attr"]].dropna()
        if len(both) > 2:
            out["attr_spearman"] = float(both["delta_ce"].rank().corr(both["delta_ce_attr"].rank()))
    return out


@dataclass
class FreshStitch:
    """A stitching evaluation the backend just ran, next to what the atlas stores for the same pair."""

    curve: pd.DataFrame  # step, action, l0, mse, ce_loss
    latents: pd.DataFrame  # latent, kind, stored_kind, delta_mse, stored_delta_mse
    n_tokens: int | None
    rank_corr: float | None  # Spearman of fresh vs stored ΔMSE
    kind_agreement: float | None


def fresh_stitch(atlas: Atlas, small: int, large: int, result: dict[str, Any]) -> FreshStitch:
    """Line a backend stitching result up with the atlas's stored values for the large SAE's latents."""
    curve = pd.DataFrame(result.get("curve") or [], columns=["step", "action", "l0", "mse", "ce_loss"])
    n = atlas.n_latents(large)
    cols: dict[str, list[Any]] = {k: v for k in ("kind", "delta_mse", "group_id")
                                  if isinstance(v := result.get(k), list)}
    fresh = pd.DataFrame({k: v for k, v in cols.items() if len(v) == n})
    fresh.insert(0, "latent", np.arange(n)[: len(fresh)] if len(fresh) else [])
    stored = atlas.latents_table(large, ["latent", "label", "kind", "delta_mse"]).rename(
        columns={"kind": "stored_kind", "delta_mse": "stored_delta_mse"})
    table = stored.merge(fresh, on="latent", how="left") if len(fresh) else stored
    table["label"] = table["label"].map(show_token)
    corr = agree = None
    if "delta_mse" in table:
        both = table[["delta_mse", "stored_delta_mse"]].astype(float).dropna()
        if len(both) > 2:
            corr = float(both["delta_mse"].rank().corr(both["stored_delta_mse"].rank()))
    if "kind" in table:
        agree = float((table["kind"] == table["stored_kind"]).mean())
    return FreshStitch(curve, table, result.get("n_tokens"), corr, agree)


def fresh_differences(atlas: Atlas, small: int, large: int, result: dict[str, Any],
                      request: dict[str, Any] | None = None) -> list[str]:
    """Why a fresh evaluation's numbers differ from the stored ones, in words: other tokens, other filtering."""
    stored = stitch_pair(atlas, small, large) or StitchPair(small=small, large=large)
    cfg = atlas.manifest.build.config
    req = request or {}
    n, n_ce = result.get("n_tokens"), result.get("n_ce_tokens")
    out = []
    if "text" in req:
        what = "your text"
    else:
        what = f"{fmt(req.get('n_tokens'))} tokens of the atlas's corpus (sample seed {req.get('seed', 0)})"
    out.append(f"Other tokens: the fresh numbers come from {what}; the atlas measured MSE on "
               f"{fmt(stored.eval_tokens)} held-out corpus tokens and CE on {fmt(stored.ce_tokens)}. "
               "The same tokens give the same numbers (a test holds the two paths equal); different tokens give "
               "different ones, most of all on a few hundred tokens.")
    ratio = result.get("max_norm_ratio")
    sinks = result.get("n_sink_tokens")
    if ratio is not None:
        out.append(f"Same filtering as the atlas: position 0 of every context and {fmt(sinks)} attention-sink "
                   f"token{'s' if sinks != 1 else ''} (norm above {ratio:g}× the median) are left out of MSE, as in "
                   f"the build; CE uses every position after the first ({fmt(n_ce)} tokens).")
    elif cfg.get("max_norm_ratio") is not None:
        out.append(f"Other filtering: this evaluation kept attention-sink tokens in its MSE, which the atlas leaves "
                   f"out (norm above {cfg['max_norm_ratio']:g}× the median); a single sink can multiply MSE many "
                   f"times. Measured on {fmt(n)} tokens.")
    fresh_pairs = result.get("attr_exact_pairs")
    if stored.attr_exact_pairs and fresh_pairs is not None and fresh_pairs != stored.attr_exact_pairs:
        out.append(f"Other attribution: the atlas's ΔCE attribution had its {stored.attr_exact_pairs:,} largest "
                   f"latent-context terms computed exactly; this evaluation's had {fresh_pairs:,}"
                   + (" (a Ray cluster computes first-order attribution only)" if not fresh_pairs else "") + ".")
    return out
