"""Overview page: the atlas's facts, the ladder, the stitching pairs and the paper's findings with this atlas's
numbers (also what ``metasae.report`` writes into results.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from metasae.atlas import Atlas, MetaRows, SaeInfo, SeedBaseline, ShowcaseItem
from metasae.views.badges import ALWAYS_ON, DENSE, RARE
from metasae.views.text import fmt, number

LADDER_COLUMNS = ["width", "l0", "mse", "fvu", "ce_loss", "ce_delta"]
PAPER = {"novel_frac": 0.35, "meta_explained": 0.5, "overlap": 0.2892}  # arXiv 2502.04878 (GPT-2 small)


def overview_facts(atlas: Atlas) -> dict[str, Any]:
    """Model, hook, corpus and meta-SAE facts from the manifest (missing entries are None)."""
    m = atlas.manifest
    meta = m.meta_sae
    return {
        "model": m.model.name, "model_source": m.model.source, "hook": m.model.hook, "d_model": m.model.d_model,
        "corpus": ", ".join(m.corpus.sources) or None, "n_tokens": m.corpus.n_tokens, "widths": atlas.widths,
        "n_latents": int(sum(atlas.n_latents(w) for w in atlas.widths)),
        "meta_width": meta.width if meta.width is not None else atlas.n_meta_latents, "meta_k": meta.k,
        "meta_fvu": meta.fvu, "meta_terms": meta.terms_per_latent, "meta_overlap": meta.overlap_value,
        "threshold": m.stitching.threshold, "synthetic": m.synthetic,
    }


def ladder_table(atlas: Atlas) -> pd.DataFrame:
    """One row per SAE width: width, latents, L0, MSE, FVU, CE loss, ΔCE (from the manifest)."""
    rows = [{k: getattr(s, k) for k in LADDER_COLUMNS} for s in atlas.manifest.saes]
    df = pd.DataFrame(rows, columns=LADDER_COLUMNS)
    known = set(df["width"])
    extra = [{"width": w} for w in atlas.widths if w not in known]  # widths the manifest forgot still appear
    if extra:
        df = pd.concat([df, pd.DataFrame(extra, columns=LADDER_COLUMNS)], ignore_index=True)
    df = df.sort_values("width").reset_index(drop=True)
    df.insert(1, "latents", [atlas.n_latents(int(w)) if int(w) in atlas.widths else None for w in df["width"]])
    for c in LADDER_COLUMNS[1:]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def pair_summaries(atlas: Atlas) -> pd.DataFrame:
    """Per stitching pair: small, large, novel_frac, n_groups (+ attr_spearman etc. when recorded)."""
    # only what the build recorded: a column no pair has stays absent, as callers test for it
    rows = [p.model_dump(exclude_unset=True) for p in atlas.manifest.stitching.pairs]
    df = pd.DataFrame(rows)
    have = {(int(r["small"]), int(r["large"])) for r in rows}
    ws = atlas.widths
    missing = []
    for small, large in zip(ws[:-1], ws[1:], strict=True):  # compute what the manifest does not record
        if (small, large) not in have:
            kind = atlas.latents_table(large, ["kind"])["kind"]
            missing.append({"small": small, "large": large, "novel_frac": float((kind == "novel").mean())})
    if missing:
        df = pd.concat([df, pd.DataFrame(missing)], ignore_index=True)
    if df.empty:
        return pd.DataFrame(columns=["small", "large", "novel_frac", "pair"])
    df = df.sort_values(["small", "large"]).reset_index(drop=True)
    df["pair"] = [f"{a}→{b}" for a, b in zip(df["small"], df["large"], strict=True)]
    return df


def max_cos(atlas: Atlas) -> dict[int, np.ndarray]:
    """Per width above the smallest: every latent's max cosine with the next smaller width's latents."""
    out = {}
    for w in atlas.widths[1:]:
        c = atlas.latents_table(w, ["nearest_smaller_cos"])["nearest_smaller_cos"].to_numpy(dtype=float)
        c = c[np.isfinite(c)]
        if len(c):
            out[w] = c
    return out


def curves(atlas: Atlas) -> dict[tuple[int, int], pd.DataFrame]:
    """Every stitching interpolation curve, by (small, large)."""
    return {p: atlas.stitching_curve(*p) for p in atlas.stitching_pairs()}


def findings(atlas: Atlas) -> dict[str, Any]:
    """The numbers that tell the paper's two findings for this atlas (new manifest fields read with fallbacks)."""
    facts = overview_facts(atlas)
    pairs = pair_summaries(atlas)

    def mean(col: str) -> float | None:
        v = pd.to_numeric(pairs[col], errors="coerce").dropna() if col in pairs else pd.Series(dtype=float)
        return float(v.mean()) if len(v) else None

    nf = pairs["novel_frac"].dropna() if "novel_frac" in pairs else pd.Series(dtype=float)
    meta = atlas.manifest.meta_sae
    fvu = facts["meta_fvu"]
    heldout, train, rand = number(meta.heldout_fvu), number(meta.train_fvu), number(meta.random_heldout_fvu)
    return {
        "novel_frac_mean": float(nf.mean()) if len(nf) else None,
        "novel_frac_min": float(nf.min()) if len(nf) else None,
        "novel_frac_max": float(nf.max()) if len(nf) else None,
        "novel_functional": mean("novel_frac_functional"), "novel_cos_live": mean("novel_frac_cos_live"),
        "monotone_frac": mean("monotone_frac"), "seed_baseline": atlas.manifest.stitching.seed_baseline,
        "groups_help_alone": mean("groups_help_alone"), "families_help_alone": mean("families_help_alone"),
        "n_pairs": len(pairs), "threshold": facts["threshold"],
        "meta_var_explained": None if fvu is None else 1.0 - float(fvu),
        "meta_heldout_explained": None if heldout is None else 1.0 - heldout,
        "meta_train_explained": None if train is None else 1.0 - train,
        "meta_random_explained": None if rand is None else 1.0 - rand,
        "meta_seed_stability": number(meta.seed_matched_frac), "meta_rows": meta.rows,
        "meta_width": facts["meta_width"], "meta_k": facts["meta_k"], "meta_terms": facts["meta_terms"],
        "meta_overlap": facts["meta_overlap"], "meta_overlap_measured": facts["meta_overlap"] is not None,
    }


def path_shape(curves: dict[tuple[int, int], pd.DataFrame]) -> dict[str, float | None]:
    """How smooth the stitched paths are: share of steps where MSE does not rise, and the highest point of any
    path over the larger of its two ends (1.0 = never above the rungs)."""
    steps = rises = 0
    peak = None
    for c in curves.values():
        mse = pd.to_numeric(c["mse"], errors="coerce").dropna().to_numpy() if len(c) else np.array([])
        if len(mse) < 2:
            continue
        d = np.diff(mse)
        steps, rises = steps + len(d), rises + int((d > 0).sum())
        ends = max(mse[0], mse[-1])
        if ends > 0:
            peak = max(peak or 0.0, float(mse.max() / ends))
    return {"monotone_frac": None if not steps else 1 - rises / steps, "peak_over_ends": peak}


def paper_notes(atlas: Atlas) -> dict[str, str]:
    """One plain sentence per headline number that differs from the paper, built from this atlas's values.

    Keys: "novel", "paths", "meta", "meta_siblings", "overlap" (absent when the atlas agrees with the paper or does not say).
    """
    f = findings(atlas)
    out: dict[str, str] = {}
    func, cos_all, cos_live = f["novel_functional"], f["novel_frac_mean"], f["novel_cos_live"]
    head = func if func is not None else cos_all
    if head is not None and abs(head - PAPER["novel_frac"]) > 0.05:
        parts = []
        if func is not None:
            parts.append(f"{func:.0%} by the paper's functional test (inserting the latent lowers the smaller "
                         f"SAE's MSE)")
        if cos_live is not None:
            parts.append(f"{cos_live:.0%} of live latents by the cosine proxy")
        elif cos_all is not None:
            parts.append(f"{cos_all:.0%} of all latents by the cosine proxy")
        text = f"The paper finds ~{PAPER['novel_frac']:.0%} novel on GPT-2; here " + " and ".join(parts)
        base: SeedBaseline | None = f["seed_baseline"]
        mis = number(base.mismatch_frac) if base is not None else None
        if base is not None and mis is not None:
            text += (f", while two training seeds of the same width {fmt(base.width)} already leave "
                     f"{mis:.0%} of live latents without a partner at cos ≥ {f['threshold']:g} — so that much "
                     f"'novelty' appears without any change of width")
        out["novel"] = text + "."
    shape = path_shape(curves(atlas))
    mono = f["monotone_frac"] if f["monotone_frac"] is not None else shape["monotone_frac"]
    peak = shape["peak_over_ends"]
    if (mono is not None and mono < 0.95) or (peak is not None and peak > 1.05):
        text = "In the paper these paths fall smoothly; here"
        if mono is not None:
            text += f" MSE does not rise on {mono:.0%} of the steps"
        if peak is not None and peak > 1.05:
            text += (f"{',' if mono is not None else ''} and a path climbs to {peak:.1f}× the MSE of its higher "
                     "end: groups are ordered by their effect measured alone, and applied together those effects "
                     "do not add up")
        alone, fams = f["groups_help_alone"], f["families_help_alone"]
        if alone is not None and fams is not None:
            text += (f". Only {alone:.0%} of the groups lower MSE when applied alone, and {fams:.0%} of whole "
                     "families (a smaller latent swapped for every larger latent nearest to it), so no order of "
                     "these steps can fall smoothly: the larger SAE's gain comes from its latents together")
        out["paths"] = text + "."
    ve = f["meta_heldout_explained"] if f["meta_heldout_explained"] is not None else f["meta_var_explained"]
    if ve is not None and abs(ve - PAPER["meta_explained"]) > 0.1:
        which = "held-out decoder rows" if f["meta_heldout_explained"] is not None else "its training rows"
        text = f"The paper's meta-SAE explains about half of the variance; this one explains {ve:.0%} of {which}"
        if f["meta_random_explained"] is not None:
            text += f" (a meta-SAE on random rows: {f['meta_random_explained']:.0%})"
        rows: MetaRows | None = f["meta_rows"]
        if rows is not None and rows.n_rows:
            text += (f", trained on {rows.n_rows:,} rows "
                     + ("pooled over the widths" if rows.source == "pooled" else "of the largest SAE"))
        out["meta"] = text + "."
    bins = atlas.manifest.meta_sae.heldout_by_nearest
    low_fvu, high_fvu = (bins[0].heldout_fvu, bins[-1].heldout_fvu) if len(bins) > 1 else (None, None)
    if low_fvu is not None and high_fvu is not None:
        out["meta_siblings"] = (
            f"Pooled rows hold one latent at several widths, so part of the held-out score is recall: on held-out "
            f"rows with a sibling among the training rows (cosine ≥ {bins[-1].lo:g}) it explains "
            f"{1 - high_fvu:.0%}, on rows without one (cosine < {bins[0].hi:g}) {1 - low_fvu:.0%}.")
    ov = f["meta_overlap"]
    if not f["meta_overlap_measured"] and atlas.manifest.meta_sae.overlap_recorded:
        out["overlap"] = ("The paper measures a 28.92% overlap between sharing a meta-latent and sharing a "
                          "stitching group; on this atlas it is not measurable (too few swap groups).")
    elif ov is not None and abs(float(ov) - PAPER["overlap"]) > 0.05:
        out["overlap"] = (f"The paper measures a {PAPER['overlap']:.2%} overlap between sharing a meta-latent and "
                          f"sharing a stitching group; here it is {float(ov):.2%}.")
    return out


def showcase(atlas: Atlas, role: str | None = None) -> ShowcaseItem | None:
    """The build's showcase latent (the first one, or the first of ``role``) if it is in this atlas, else None."""
    for item in atlas.manifest.showcase:
        if role and item.role != role:
            continue
        if item.width in atlas.widths and 0 <= item.latent < atlas.n_latents(item.width):
            return item
    return None


def latent_counts(atlas: Atlas) -> pd.DataFrame:
    """Per width: latents, dead, rare, dense and the share of active slots taken by always-on latents
    (the manifest's counts, or computed from the density column when an older atlas lacks them)."""
    rows = []
    for w in atlas.widths:
        rec = atlas.manifest.sae(w) or SaeInfo(width=w)
        d = atlas.latents_table(w, ["density"])["density"].to_numpy(dtype=float)
        d = np.nan_to_num(d, nan=0.0)

        def given(x: Any, computed: Any) -> Any:
            return computed if x is None else x

        rows.append({"width": w, "latents": len(d),
                     "dead": given(rec.n_dead, int((d == 0).sum())),
                     "rare": given(rec.n_rare, int(((d > 0) & (d < RARE)).sum())),
                     "dense": given(rec.n_dense, int((d > DENSE).sum())),
                     "always_on_share": given(rec.always_on_share,
                                              float(d[d > ALWAYS_ON].sum() / d.sum()) if d.sum() > 0 else None)})
    return pd.DataFrame(rows, columns=["width", "latents", "dead", "rare", "dense", "always_on_share"])
