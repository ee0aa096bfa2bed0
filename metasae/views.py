"""What each dashboard page shows, computed from an opened atlas without Streamlit (so it is unit-tested).

Pages call these functions, then draw the results with ``metasae.plots`` and a few Streamlit widgets. Every
function here answers from the atlas's in-memory indexes (``metasae.atlas``) and ``metasae.search``: a page
rerun costs milliseconds, even at paper scale.
"""

from __future__ import annotations

import functools
import html
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from metasae.app_state import BadInput, Term, clean_query
from metasae.atlas import (
    DEAD_LABEL,
    Atlas,
    AtlasError,
    MetaRows,
    SaeInfo,
    SeedBaseline,
    ShowcaseItem,
    StitchPair,
    UnknownLatentError,
)

KIND_COLORS = {"novel": "#e4572e", "reconstruction": "#4c78a8", None: "#9e9e9e"}
LADDER_COLUMNS = ["width", "l0", "mse", "fvu", "ce_loss", "ce_delta"]


# --------------------------------------------------------------------------------------------- text helpers


_MARKERS = ("\u0120", "\u2581", "\u010a")


def show_token(tok: Any) -> str:
    """A token as readable text: BPE space markers become spaces, newlines ⏎, control bytes \\xNN."""
    if tok is None:
        return ""
    s = str(tok)
    if s.isprintable() and not any(m in s for m in _MARKERS):  # the common case, at C speed
        return s
    return _show_special(s)


@functools.lru_cache(maxsize=65536)
def _show_special(s: str) -> str:
    s = s.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n")
    out = []
    for ch in s:
        if ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("⇥")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def token_chips(tokens: list[Any] | None, limit: int = 10) -> str:
    """HTML chips for a list of tokens (escaped; leading/trailing spaces shown as ␣)."""
    if not tokens:
        return "<span style='color:#888'>none</span>"
    chips = []
    for t in list(tokens)[:limit]:
        s = show_token(t)
        s = ("␣" + s[1:] if s.startswith(" ") else s) or "∅"
        chips.append(f"<code style='margin:0 4px 4px 0;display:inline-block'>{html.escape(s)}</code>")
    return "".join(chips)


def example_html(tokens: list[Any], acts: list[float] | None, position: int | None, scale: float | None) -> str:
    """One example as HTML: each token shaded by its activation (orange), the max token outlined."""
    acts = list(acts or [0.0] * len(tokens))
    top = scale if scale and scale > 0 else max([a for a in acts if a is not None] + [1e-12])
    spans = []
    for j, (t, a) in enumerate(zip(tokens, acts, strict=False)):
        a = 0.0 if a is None or not math.isfinite(a) else float(a)
        alpha = min(max(a / top, 0.0), 1.0) if top > 0 else 0.0
        style = f"background:rgba(255,140,0,{alpha:.2f});white-space:pre;border-radius:3px;padding:0 1px"
        if j == position:
            style += ";outline:2px solid #c0392b"
        spans.append(f"<span title='{a:.4g}' style='{style}'>{html.escape(show_token(t))}</span>")
    return "<div style='font-family:monospace;line-height:1.9;font-size:0.92em'>" + "".join(spans) + "</div>"


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a metric: significant digits, '—' for missing values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    v = float(x)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e7):  # compact: metrics have little room
        return f"{v:.{max(digits - 2, 1)}e}"
    return f"{v:.{digits}g}"


MISSING = "—"


def to_csv(df: pd.DataFrame) -> bytes:
    """A table as CSV bytes (what a download button hands out); lists are kept as their text."""
    return df.to_csv(index=False).encode()


def to_parquet(df: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    df.reset_index(drop=True).to_parquet(buf, index=False)
    return buf.getvalue()


def styled(df: pd.DataFrame, column_config: dict[str, Any] | None = None) -> Any:
    """The table with missing values drawn as '—' (Streamlit shows 'None'); numbers keep their column format."""
    fmts: dict[str, Any] = {}
    for col in df.columns:
        cfg = (column_config or {}).get(col)
        spec = (cfg or {}).get("type_config", {}).get("format") if isinstance(cfg, dict) else None
        if pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col]):
            fmts[col] = _printf(spec) if spec else (lambda v: fmt(v, 4))
    if not len(df) or not (df.isna().to_numpy().any() or fmts):
        return df
    return df.style.format(fmts, na_rep=MISSING)


def _printf(spec: str) -> Any:
    """A printf-style column format ('%.3f', '%d', '%.2e') as a function."""

    def f(v: Any) -> str:
        try:
            return spec % (int(v) if spec.endswith("d") else float(v))
        except (TypeError, ValueError):
            return str(v)

    return f


def latent_name(width: int, latent: int, label: Any = None) -> str:
    """'128/7 · label' — how a latent is named in links."""
    base = f"{int(width)}/{int(latent)}"
    return f"{base} · {show_token(label)}" if label else base


# --------------------------------------------------------------------------------------------- overview


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


PAPER = {"novel_frac": 0.35, "meta_explained": 0.5, "overlap": 0.2892}  # arXiv 2502.04878 (GPT-2 small)


def number(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


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

    Keys: "novel", "paths", "meta", "overlap" (absent when the atlas agrees with the paper or does not say).
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


DENSE = 0.1  # density above which a latent counts as dense (fires on more than 1 token in 10)
RARE = 1e-4


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
                                              float(d[d > 0.5].sum() / d.sum()) if d.sum() > 0 else None)})
    return pd.DataFrame(rows, columns=["width", "latents", "dead", "rare", "dense", "always_on_share"])


def badge(density: Any, label: Any = None, dense: float = DENSE) -> str:
    """'dead', 'dense' or '' for a latent (dead: never fired on the statistics tokens)."""
    d = number(density)
    if label == DEAD_LABEL or d == 0:
        return "dead"
    if d is not None and d > dense:
        return "dense"
    return ""


def with_badges(df: pd.DataFrame, dense: float = DENSE) -> pd.DataFrame:
    """Adds a 'flag' column (dead / dense / empty) after 'latent' from the density and label columns."""
    df = df.copy()
    dens = df["density"] if "density" in df else pd.Series([None] * len(df), index=df.index)
    labs = df["label"] if "label" in df else pd.Series([None] * len(df), index=df.index)
    flags = [badge(d, lab, dense) for d, lab in zip(dens, labs, strict=True)]
    at = list(df.columns).index("latent") + 1 if "latent" in df else 0
    df.insert(at, "flag", flags)
    return df


# --------------------------------------------------------------------------------------------- latent page


@dataclass
class LatentView:
    width: int
    latent: int
    row: dict[str, Any]
    decomposition: pd.DataFrame
    examples: list[dict[str, Any]]
    family: dict[str, Any]

    @property
    def label(self) -> str:
        return show_token(self.row.get("label"))


def latent_view(atlas: Atlas, width: int, latent: int) -> LatentView:
    """Everything the latent page shows about one latent (UnknownLatentError if absent)."""
    return LatentView(width, latent, atlas.latent(width, latent), atlas.decomposition(width, latent),
                      atlas.examples(width, latent), atlas.family(width, latent))


def effects(row: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(name, value, help) of the latent's stitching effects that the atlas recorded."""
    spec = [
        ("ΔMSE", "delta_mse", "Change in reconstruction MSE when this latent is added to the smaller SAE "
                              "(novel) or removed; negative = it helps."),
        ("ΔCE", "delta_ce", "Change in next-token cross-entropy when the reconstruction is spliced into the "
                            "model, exact (ablation at the positions it fires)."),
        ("ΔCE (attribution)", "delta_ce_attr", "Attribution-patching estimate of ΔCE from one backward pass."),
        ("group ΔMSE", "group_delta_mse", "ΔMSE of swapping this latent's whole group in."),
        ("group ΔCE", "group_delta_ce", "ΔCE of swapping this latent's whole group in."),
    ]
    return [(name, row.get(col), help_) for name, col, help_ in spec if col in row]


@dataclass
class RadialGraph:
    """Nodes (with x, y) and edges of the latent -> meta-latents -> other latents graph."""

    nodes: pd.DataFrame  # kind (center|meta|latent), sae_width, latent, meta_latent, label, weight, x, y, parent
    # (node a, node b, weight, primary): primary edges form the tree (centre -> meta -> the members placed
    # around it); the others join a member to the further displayed meta-latents it also holds
    edges: list[tuple[int, int, float, bool]] = field(default_factory=list)

    def children(self, node: int) -> pd.DataFrame:
        """The member nodes placed around one meta-latent node."""
        return self.nodes[(self.nodes["kind"] == "latent") & (self.nodes["parent"] == node)]


def radial_graph(atlas: Atlas, width: int, latent: int, n_meta: int = 5, n_each: int = 5) -> RadialGraph:
    """Latent at the centre, its top meta-latents on a ring, and for each the strongest other members outside.

    Each latent is shown once (under the first meta-latent it is found for) and linked to every displayed
    meta-latent its decomposition holds.
    """
    row = atlas.latent(width, latent)
    dec = atlas.decomposition(width, latent).head(n_meta)
    nodes: list[dict[str, Any]] = [{"kind": "center", "sae_width": width, "latent": latent, "meta_latent": None,
                                    "label": row["label"], "weight": 1.0, "x": 0.0, "y": 0.0, "parent": -1}]
    edges: list[tuple[int, int, float, bool]] = []
    k = max(len(dec), 1)
    placed: dict[tuple[int, int], int] = {(width, latent): 0}
    member_sets: list[tuple[int, pd.DataFrame]] = []
    for j, (m, w, label) in enumerate(zip(dec["meta_latent"], dec["weight"], dec["label"], strict=True)):
        ang = 2 * math.pi * j / k + math.pi / 2
        nid = len(nodes)
        nodes.append({"kind": "meta", "sae_width": None, "latent": None, "meta_latent": int(m), "label": label,
                      "weight": float(w), "x": math.cos(ang), "y": math.sin(ang), "parent": 0})
        edges.append((0, nid, float(w), True))
        members = atlas.members(int(m))
        member_sets.append((nid, members))
        fresh = [r for r in members.itertuples(index=False) if (int(r.sae_width), int(r.latent)) not in placed]
        fresh = sorted(fresh, key=lambda r: r.label == DEAD_LABEL)[:n_each]  # live latents first (stable)
        step = min(2 * math.pi / k * 0.75, 1.4) / max(len(fresh) - 1, 1)  # members fan out around their meta
        for q, r in enumerate(fresh):
            a = ang + (q - (len(fresh) - 1) / 2) * step
            key = (int(r.sae_width), int(r.latent))
            placed[key] = len(nodes)
            edges.append((nid, len(nodes), float(r.weight), True))
            nodes.append({"kind": "latent", "sae_width": key[0], "latent": key[1], "meta_latent": None,
                          "label": r.label, "weight": float(r.weight), "x": 2.1 * math.cos(a),
                          "y": 2.1 * math.sin(a), "parent": nid})
    for node in nodes:  # dead / dense badges for the latent nodes
        node["flag"] = "" if node["kind"] == "meta" else badge(
            atlas.latent(int(node["sae_width"]), int(node["latent"])).get("density"), node["label"])
    parent = {i: n["parent"] for i, n in enumerate(nodes)}
    for nid, members in member_sets:
        weights = dict(zip(zip(members["sae_width"].astype(int), members["latent"].astype(int), strict=True),
                           members["weight"].astype(float), strict=True))
        for key, lid in placed.items():
            if lid != 0 and parent[lid] != nid and key in weights:
                edges.append((nid, lid, weights[key], False))
    return RadialGraph(pd.DataFrame(nodes), edges)


def node_params(node: dict[str, Any] | pd.Series) -> tuple[str, dict[str, str]]:
    """(page, query params) a radial-graph node links to: 'latent' or 'meta_latent'."""
    if node["kind"] == "meta":
        return "meta_latent", {"meta": str(int(node["meta_latent"]))}
    return "latent", {"width": str(int(node["sae_width"])), "latent": str(int(node["latent"]))}


# --------------------------------------------------------------------------------------------- meta-latent page


@dataclass
class MetaView:
    meta_latent: int
    row: dict[str, Any]
    members: pd.DataFrame  # sae_width, latent, weight, label
    per_width: pd.DataFrame  # sae_width, members, mean_weight
    cooccurring: pd.DataFrame  # meta_latent, count, fraction, label

    @property
    def label(self) -> str:
        return show_token(self.row.get("label"))


def meta_view(atlas: Atlas, m: int, top_cooccurring: int = 10) -> MetaView:
    """Everything the meta-latent page shows (UnknownLatentError if absent)."""
    row = atlas.meta_latent(m)
    members = atlas.members(m)
    per_width = (members.groupby("sae_width").agg(members=("latent", "size"), mean_weight=("weight", "mean"))
                 .reindex(atlas.widths, fill_value=0).reset_index())
    per_width["mean_weight"] = per_width["mean_weight"].astype(float)
    return MetaView(m, row, members, per_width, atlas.cooccurring_meta(m, top=top_cooccurring))


def meta_options(atlas: Atlas) -> list[tuple[int, str]]:
    """(meta-latent id, 'id · label') for pickers."""
    t = atlas.meta_latents_table(["meta_latent", "label"])
    return [(int(m), f"{int(m)} · {show_token(lab)}") for m, lab in zip(t["meta_latent"], t["label"], strict=True)]


# --------------------------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    results: pd.DataFrame
    message: str | None = None  # shown as info (empty query / no match)
    warning: str | None = None  # shown as warning (query cut)


def text_search(index: Any, query: str | None, widths: list[int] | None = None, kind: str | None = None,
                min_density: float | None = None, max_density: float | None = None,
                min_delta_mse: float | None = None, max_delta_mse: float | None = None,
                limit: int = 100) -> SearchResult:
    """Free-text search with the query cleaned first; empty queries and no matches come back as messages."""
    q, warning = clean_query(query)
    if not q:
        return SearchResult(pd.DataFrame(), "Type a word to search labels, top tokens and example text "
                                            "(e.g. a token the latent fires on).", warning)
    if min_density is not None and max_density is not None and min_density > max_density:
        raise BadInput(f"The minimum density ({min_density:g}) is above the maximum ({max_density:g}).")
    if min_delta_mse is not None and max_delta_mse is not None and min_delta_mse > max_delta_mse:
        raise BadInput(f"The minimum ΔMSE ({min_delta_mse:g}) is above the maximum ({max_delta_mse:g}).")
    res = index.text(q, widths=widths or None, kind=kind or None, min_density=min_density,
                     max_density=max_density, min_delta_mse=min_delta_mse, max_delta_mse=max_delta_mse, limit=limit)
    msg = None if len(res) else f"No latent matches {q[:80]!r} with these filters."
    return SearchResult(res, msg, warning)


def meta_search(index: Any, metas: list[int], min_weight: float = 0.0, widths: list[int] | None = None,
                limit: int = 100) -> SearchResult:
    """Latents whose decomposition holds every meta-latent in ``metas`` with weight >= ``min_weight``."""
    if not metas:
        return SearchResult(pd.DataFrame(), "Pick one or more meta-latents: the results are the latents whose "
                                            "decomposition holds all of them.")
    try:
        res = index.by_meta(list(metas), min_weight=float(min_weight), widths=widths or None, limit=limit)
    except UnknownLatentError as e:
        raise BadInput(str(e)) from None
    msg = None if len(res) else "No latent holds all of these meta-latents at that weight."
    return SearchResult(res, msg)


def decomp_search(index: Any, order: str, widths: list[int] | None = None, max_fvu: float | None = None,
                  min_terms: int | None = None, max_terms: int | None = None, limit: int = 100) -> SearchResult:
    """Live latents by decomposability (metasae.search.decomp_score): most composite or most atomic first."""
    if not index.has_decomposability():
        return SearchResult(pd.DataFrame(), "This atlas stores no decomposability scores (decomp_fvu, decomp_terms, "
                                            "decomp_entropy): it was built before they existed; rebuild it.")
    if min_terms is not None and max_terms is not None and min_terms > max_terms:
        raise BadInput(f"The minimum number of meta-latents ({min_terms}) is above the maximum ({max_terms}).")
    res = index.by_decomposability(order, widths=widths or None, max_fvu=max_fvu, min_terms=min_terms,
                                   max_terms=max_terms, limit=limit)
    return SearchResult(res, None if len(res) else "No live latent passes these filters.")


# --------------------------------------------------------------------------------------------- stitching


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


# --------------------------------------------------------------------------------------------- live


def load_meta_sae(atlas: Atlas) -> Any:
    """The atlas's meta-SAE as a ``metasae.sae.Sae`` (imports torch; cache the result)."""
    from metasae.sae import Sae, SaeError

    try:
        return Sae.load(atlas.meta_sae_path())
    except SaeError as e:
        raise AtlasError(str(e)) from e


def load_decoder(atlas: Atlas, width: int) -> np.ndarray:
    """Decoder rows (width, d_model) of one SAE of the ladder, float32 (cache the result)."""
    from metasae.sae import Sae, SaeError

    try:
        return Sae.load(atlas.sae_path(width)).W_dec.float().numpy().copy()
    except SaeError as e:
        raise AtlasError(str(e)) from e


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


def meta_label(atlas: Atlas, m: int) -> str:
    try:
        return show_token(atlas.meta_latent(int(m))["label"])
    except UnknownLatentError:
        return "(unknown)"


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


# --------------------------------------------------------------------------------------------- backend


def get_backend(atlas_path: str | None = None, preload: bool = False) -> tuple[Any | None, str | None]:
    """(backend, None), or (None, why it is unavailable).

    ``metasae.backend.client.get_backend``: METASAE_BACKEND_URL when set, else a local backend subprocess for
    ``atlas_path`` (started on first need, seconds; ``preload``: it loads the model and SAEs at once). Cache the
    result.
    """
    try:
        from metasae.backend.client import get_backend as _get
    except ImportError as e:
        return None, f"Backend unavailable: the backend client cannot be imported ({e})."
    try:
        return _get(atlas_path, preload=preload), None
    except Exception as e:  # a backend that cannot start or be reached: say why, never a traceback
        return None, f"Backend unavailable: {e}"


WARM_ENV = "METASAE_WARM_BACKEND"  # "0": do not start the local backend when the app starts


def warm_backend(atlas: Atlas, env: Mapping[str, str] | None = None) -> bool:
    """Start the local backend for ``atlas`` in a background thread, loading the model and SAEs at once
    (METASAE_PRELOAD), so the first Live result does not wait for them. Skipped for a remote backend
    (METASAE_BACKEND_URL), a synthetic atlas (no model to load) or METASAE_WARM_BACKEND=0. True if started."""
    import os
    import threading

    env = os.environ if env is None else env
    assert env is not None
    if env.get("METASAE_BACKEND_URL") or env.get(WARM_ENV, "1") == "0" or atlas.manifest.synthetic:
        return False
    # preload only this backend: setting METASAE_PRELOAD in our own environment would reach every backend
    # started later by this process (tests start many)
    threading.Thread(target=get_backend, args=(str(atlas.path),), kwargs={"preload": True},
                     name="metasae-warm-backend", daemon=True).start()
    return True


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


def backend_problem(health: dict[str, Any], atlas: Atlas) -> str | None:
    """Why a backend's answers would not fit this atlas (another model, or it failed to open its atlas)."""
    if health.get("status") == "error" or health.get("atlas_error"):
        return f"The backend cannot serve its atlas: {health.get('atlas_error') or 'error'}"
    model = health.get("model")
    if model and atlas.model_name and model != atlas.model_name:
        return (f"The backend serves an atlas of model {model!r}, this one is of {atlas.model_name!r}: its "
                "answers would not match this atlas. Point METASAE_BACKEND_URL at a backend for this atlas.")
    return None


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
    return out
