"""docs/results.md: the paper's analyses redone on an atlas, with PNG figures and the paper's numbers beside ours.

    python -m metasae.report --atlas data --out docs

Figures are the dashboard's own plotly figures (metasae.plots) written to PNG with kaleido (it drives the
system Chromium; BROWSER_PATH=/usr/bin/chromium when it does not find one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from metasae import plots, views
from metasae.atlas import Atlas

PAPER = {"novel_frac": "~35% (GPT-2, 768..98304)", "meta_var_explained": "roughly half (49152 rows, 2304 meta)",
         "overlap": "28.92% (meta co-membership vs edges to the 3072 SAE)", "terms": "4 (BatchTopK k=4)"}
# Words searched for the worked decompositions: a person, a place, a science topic.
WORKED = [("person", ["Einstein", "physicist", "Newton", "Darwin", "Shakespeare", "composer"]),
          ("place", ["Germany", "German", "France", "Paris", "London", "city"]),
          ("science", ["physics", "chemistry", "energy", "atom", "molecule", "biology"])]


def _png(fig: go.Figure, path: Path, width: int = 900, height: int = 450) -> str:
    os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_image(str(path), width=width, height=height, scale=1)
    return path.name


def find_latent(atlas: Atlas, words: list[str], width: int) -> tuple[dict, str] | None:
    """The latent of `width` whose top activating tokens best match one of the words (first word wins)."""
    t = atlas.latents_table(width, ["latent", "label", "top_tokens", "density"])
    for w in words:
        wl = w.lower()
        score = t.top_tokens.map(lambda toks, wl=wl: next(
            (len(toks) - i for i, tok in enumerate(list(toks)[:5]) if str(tok).strip().lower() == wl), 0))
        if score.max() > 0:
            best = t.loc[score.idxmax()]
            return atlas.latent(width, int(best.latent)), w
    return None


LIVE_DENSITY = 1e-4  # fires at least once in 10k tokens
ALWAYS_ON_DENSITY = 0.5


def ladder_health(atlas: Atlas) -> pd.DataFrame:
    """Per width: dead (never fired on the statistics tokens), rarely firing and always-on latents."""
    rows = []
    for w in atlas.widths:
        d = atlas.latents_table(w, ["density"])["density"].to_numpy(dtype=float)
        rows.append({"width": w, "dead": float((d == 0).mean()), "rare": float(((d > 0) & (d < LIVE_DENSITY)).mean()),
                     "always_on": int((d > ALWAYS_ON_DENSITY).sum())})
    return pd.DataFrame(rows)


def pair_detail(atlas: Atlas, small: int, large: int) -> dict[str, float]:
    """Novel fraction among live latents only, and exact-vs-attribution ΔCE agreement split by effect size."""
    t = views.stitching_table(atlas, small, large)  # holds the large SAE's density column
    live = t[t["density"].to_numpy(dtype=float) >= LIVE_DENSITY]
    out = {"live_frac": len(live) / max(len(t), 1),
           "novel_live": float((live["kind"] == "novel").mean()) if len(live) else float("nan")}
    both = t[["delta_ce", "delta_ce_attr"]].dropna() if "delta_ce_attr" in t else pd.DataFrame()
    small_eff = both[both["delta_ce"].abs() < 0.05]
    out["spearman_small"] = (float(small_eff["delta_ce"].rank().corr(small_eff["delta_ce_attr"].rank()))
                             if len(small_eff) > 2 else float("nan"))
    out["n_small"] = len(small_eff)
    return out


def path_row(small: int, large: int, c: pd.DataFrame) -> str:
    """One markdown table row: MSE and CE at both ends of a stitching path and their extremes along it."""
    mse, step = c["mse"].to_numpy(dtype=float), c["step"].to_numpy()
    ce = c.dropna(subset=["ce_loss"])
    lo, hi = int(mse.argmin()), int(mse.argmax())
    cells = [f"{small}→{large}", f"{mse[0]:.0f} → {mse[-1]:.0f}", f"{mse[lo]:.0f} ({step[lo]})",
             f"{mse[hi]:.0f} ({step[hi]})"]
    if len(ce) >= 2:
        v, steps = ce["ce_loss"].to_numpy(dtype=float), ce["step"].to_numpy()
        cells += [f"{v[0]:.3f} → {v[-1]:.3f}", f"{v.min():.3f} ({steps[v.argmin()]})",
                  f"{v.max():.3f} ({steps[v.argmax()]})"]
    else:
        cells += ["—", "—", "—"]
    return "| " + " | ".join(cells) + " |"


def ce_note(curves: dict[tuple[int, int], pd.DataFrame]) -> list[str]:
    """A sentence for the pairs whose path reaches a lower next-token loss than both of its SAEs."""
    below = []
    for (s, lg), c in sorted(curves.items()):
        v = c["ce_loss"].dropna().to_numpy(dtype=float)
        if len(v) >= 3 and v.min() < min(v[0], v[-1]) - 1e-3:
            below.append(f"{s}→{lg} ({v.min():.3f} vs {v[0]:.3f} and {v[-1]:.3f})")
    if not below:
        return []
    return ["", "Mid-path, the stitched SAE predicts the next token better than both of its end points for "
            + ", ".join(below) + ": adding the novel latents that help most, before any old latent is "
            "removed, gives an SAE wider than either rung, with a higher L0."]


def meta_terms_figure(atlas: Atlas, width: int) -> go.Figure:
    dec = atlas.tables["decompositions"].to_pandas()
    n = dec[dec.sae_width == width].groupby("latent").size()
    fig = go.Figure(go.Histogram(x=n, xbins=dict(start=0.5, end=float(n.max()) + 0.5, size=1)))
    fig.update_layout(title=f"Meta-latents per latent (width {width})", xaxis_title="meta-latents in decomposition",
                      yaxis_title="latents", template="plotly_white")
    return fig


def write_report(atlas_path: str | Path, out_dir: str | Path) -> Path:
    atlas = Atlas.open(atlas_path)
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    m = atlas.manifest
    facts = views.overview_facts(atlas)
    pairs = views.pair_summaries(atlas)
    ladder = views.ladder_table(atlas)
    curves = views.curves(atlas)
    f_ladder = _png(plots.ladder_figure(ladder, curves), fig_dir / "mse_vs_l0.png")
    f_novel = _png(plots.novel_fraction_figure(pairs), fig_dir / "novel_fraction.png", height=380)
    f_cos = _png(plots.max_cos_figure(views.max_cos(atlas), facts["threshold"]), fig_dir / "max_cos.png")
    f_ce = [_png(plots.stitch_ce_figure(c, s, lg), fig_dir / f"ce_vs_l0_{s}_{lg}.png", height=380)
            for (s, lg), c in sorted(curves.items())]
    largest = atlas.widths[-1]
    f_terms = _png(meta_terms_figure(atlas, largest), fig_dir / "meta_terms.png", height=350)
    health = ladder_health(atlas)
    n_stats = (m["build"].get("config") or {}).get("stats_tokens")
    stats_tokens = f"{n_stats:,} tokens" if n_stats else "its tokens"
    bcfg = m["build"].get("config") or {}
    train_tokens = f"{bcfg['train_tokens']:,}" if bcfg.get("train_tokens") else "a few hundred thousand"
    max_norm = bcfg.get("max_norm_ratio")
    pair_rows = [views.pair_summary(atlas, p["small"], p["large"]) for p in m["stitching"]["pairs"]]
    details = [pair_detail(atlas, p["small"], p["large"]) for p in pair_rows]
    ms = m.get("meta_sae") or {}
    ov = ms.get("overlap") or {}
    lines = [
        "# Results on the bundled demo atlas",
        "",
        f"Generated by `python -m metasae.report --atlas {atlas_path} --out {out_dir}` from the atlas built with "
        f"`{m['build']['command']}`.",
        "",
        f"Model **{m['model']['name']}**, hook `{m['model']['hook']}` (d_model {m['model']['d_model']}); corpus "
        f"{', '.join(m['corpus']['sources'])}, {m['corpus']['n_tokens']:,} tokens. "
        f"Ladder {', '.join(str(w) for w in atlas.widths)}; meta-SAE {ms.get('width')} meta-latents, k={ms.get('k')}.",
        "",
        "## The ladder",
        "",
        "| width | L0 | MSE | FVU | CE loss | ΔCE vs clean | dead | density < 1e-4 | always on (> 0.5) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {s['width']} | {s['l0']:.1f} | {s['mse']:.2f} | {s['fvu']:.3f} | {s['ce_loss']:.3f} | "
          f"{s['ce_delta']:+.3f} | {h.dead:.1%} | {h.rare:.1%} | {h.always_on} |"
          for s, h in zip(m["saes"], health.itertuples(), strict=True)],
        "",
        "Dead, rare and always-on counts come from the statistics pass "
        f"({stats_tokens}). Always-on latents fire on (nearly) "
        "every token with large activations: they spend part of the k budget on a dense, position-dependent "
        "component of this layer rather than on sparse features.",
        "",
        "## Finding 1: larger SAEs add novel latents and re-cut old ones",
        "",
        "| pair | novel | novel among live | groups | swaps | adds | removes | attribution vs exact ΔCE "
        "(Spearman: all / \\|ΔCE\\| < 0.05) | paper novel |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {p['small']}→{p['large']} | {p['novel_frac']:.1%} | {d['novel_live']:.1%} | {p.get('n_groups', '')} | "
          f"{p.get('n_swap', '')} | {p.get('n_add', '')} | {p.get('n_remove', '')} | "
          f"{p.get('attr_spearman', float('nan')):.2f} / {d['spearman_small']:.2f} (n={d['n_small']}) | "
          f"{PAPER['novel_frac']} |" for p, d in zip(pair_rows, details, strict=True)],
        "",
        f"“Live” latents fire on at least {LIVE_DENSITY:g} of tokens. The exact ΔCE (splicing the stitched SAE "
        "into the model) is computed for a sample per pair: half the latents with the largest attributed effect, "
        "half drawn among those that fire on the CE tokens. Attribution is a first-order estimate; it tracks the "
        "small effects and misses the large, non-linear ones (always-on latents added on top of the small SAE).",
        "",
        f"![novel fraction](figures/{f_novel})",
        "",
        f"Max cosine of each latent with the next smaller SAE (threshold {facts['threshold']}):",
        "",
        f"![max cosine](figures/{f_cos})",
        "",
        "Stitching: starting from the small SAE, novel latents are added, swap groups exchanged and unmatched "
        "small latents removed one at a time, each action ranked by its own ΔMSE against the small SAE (largest "
        "benefit first). Along each path (log scale):",
        "",
        "| pair | MSE small → large | lowest MSE on the path (step) | highest MSE on the path (step) | "
        "CE small → large | lowest CE measured (step) | highest CE measured (step) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[path_row(s, lg, c) for (s, lg), c in sorted(curves.items()) if not c.empty],
        "",
        "In the paper the path moves smoothly from one SAE to the next. Here the helpful actions come first and "
        "the path's last steps re-cut the always-on subspace: removing the small SAE's always-on latents and "
        "adding the large SAE's, one at a time, overshoots the MSE before both sets are exchanged.",
        *ce_note(curves),
        "",
        f"![MSE vs L0](figures/{f_ladder})",
        "",
        "Next-token loss along the same paths (measured at a dozen points per pair):",
        "",
        *[f"![CE vs L0](figures/{f})" for f in f_ce],
        "",
        "## Finding 2: latents decompose into meta-latents",
        "",
        "| | demo | paper |",
        "|---|---:|---|",
        f"| meta-SAE variance explained | {1 - ms.get('fvu', float('nan')):.1%} | {PAPER['meta_var_explained']} |",
        f"| meta-latents per latent (mean) | {ms.get('terms_per_latent', float('nan')):.2f} | {PAPER['terms']} |",
        f"| co-membership pairs that are also stitching pairs | {ov.get('overlap_of_meta', float('nan')):.2%} | "
        f"{PAPER['overlap']} |",
        f"| stitching pairs that share a meta-latent | {ov.get('overlap_of_stitch', float('nan')):.2%} | |",
        "",
        f"![meta-latents per latent](figures/{f_terms})",
        "",
        "### Worked decompositions",
        "",
    ]
    for kind, words in WORKED:
        hit = find_latent(atlas, words, largest)
        if hit is None:
            lines += [f"- {kind}: no latent of width {largest} has any of {words} among its top tokens.", ""]
            continue
        row, word = hit
        dec = atlas.decomposition(largest, int(row["latent"]))
        parts = ", ".join(f"**{r.label}** ({r.weight:.2f})" for r in dec.itertuples())
        lines += [f"- **{kind}** — latent {largest}/{row['latent']} “{row['label']}” (matched “{word}”; top tokens "
                  f"{', '.join(repr(t) for t in list(row['top_tokens'])[:6])}) → {parts}", ""]
    lines += [
        "## Where the demo differs from the paper",
        "",
        "- Model and scale: SmolLM2-135M (30 layers, d_model 576) at layer 15, not GPT-2 small at layer 8; widths "
        f"{atlas.widths[0]}..{largest} instead of 768..98304; a few million tokens of Wikipedia sample and WordNet "
        f"glosses instead of hundreds of millions of web tokens; each SAE trained on {train_tokens} tokens on "
        "a 2-core CPU, so the SAEs are far less converged than the paper's. Two SAEs that have not converged "
        "share few decoder directions, which alone pushes the novel fraction up; the paper's ~35% should not be "
        "expected at this budget.",
        "- Always-on latents: this layer has a dense, position-dependent component (one residual dimension carries "
        "a large, slowly drifting value on every token). Each SAE spends a dozen or more latents on it "
        "(the ladder table's last column); neighbouring SAEs cut that subspace differently, with pairwise cosines "
        "just under the threshold, so these count as novel although together they are a re-cut of the same "
        "subspace, and adding one of them on top of the small SAE raises the MSE sharply (the bumps in the "
        "stitching curves).",
        "- Attention sinks: besides position 0, about 0.006% of tokens have residual norms 10-100x the median and "
        "held over half of the variance; they are left out of training and of MSE/FVU/ΔMSE "
        f"(max_norm_ratio = {max_norm}) but stay in the CE evaluation.",
        "- Architecture: BatchTopK (k=32, saved as JumpReLU) instead of ReLU+L1, so L0 is nearly the same across "
        "widths, whereas the paper's ladder lets L0 grow slowly with width.",
        "- ΔCE is measured on a few thousand evaluation tokens; attribution ΔCE is stored for every latent and the "
        "exact value for a sample per pair (see the Spearman column).",
        "- The meta-SAE is trained on the largest SAE's decoder rows (as in the paper), dead latents included, "
        f"with {ms.get('width')} meta-latents for {largest} rows.",
    ]
    path = out_dir / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="data")
    p.add_argument("--out", default="docs")
    a = p.parse_args(argv)
    print(write_report(a.atlas, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
