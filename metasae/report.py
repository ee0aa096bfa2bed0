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
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from metasae import plots
from metasae.atlas import (
    COS_THRESHOLD,
    Atlas,
    Manifest,
    MetaRows,
    MetaSaeInfo,
    Overlap,
    SeedBaseline,
    SeedStability,
    StitchPair,
)
from metasae.views import overview, stitching
from metasae.views.badges import ALWAYS_ON, RARE

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


LIVE_DENSITY = RARE  # fires at least once in 10k tokens (the dashboard's rare / live line)
ALWAYS_ON_DENSITY = ALWAYS_ON


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
    t = stitching.stitching_table(atlas, small, large)  # holds the large SAE's density column
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


def _pct(x, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and x != x) else f"{100 * x:.{digits}f}%"


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def targets(m: Manifest) -> list[tuple[str, str, str, bool | None]]:
    """Issue 10's targets: (measure, target, measured, met) from the manifest alone."""
    pairs = m.stitching.pairs
    base = m.stitching.seed_baseline or SeedBaseline()
    ms = m.meta_sae
    largest = m.saes[-1]
    func = [p.novel_frac_functional for p in pairs]
    cos = [p.novel_frac_cos_live for p in pairs]
    mono = [p.monotone_frac for p in pairs]
    alone = [p.groups_help_alone for p in pairs]
    fams = [p.families_help_alone for p in pairs]
    shares = [s.always_on_share for s in m.saes]
    tr, ho, rnd = (1 - _nan(v) for v in (ms.train_fvu, ms.heldout_fvu, ms.random_heldout_fvu))
    sc = {p.role: p for p in m.showcase}
    person = sc["person"].seeds if "person" in sc else []
    nat = sc["nationality"].seeds if "nationality" in sc else []

    def ok(vals, lo=-1.0, hi=2.0):
        vals = [v for v in vals if v is not None]
        return bool(vals) and all(lo <= v <= hi for v in vals)

    def seed(v: float | None) -> str:
        return "" if v is None else f" (same width, other seed: {_pct(v)})"

    return [
        ("functional novel fraction of live latents, each pair", "25-55%",
         " / ".join(map(_pct, func)) + seed(base.novel_frac_functional), ok(func, .25, .55)),
        ("cosine-novel among live latents, each pair", "<= 70%",
         " / ".join(map(_pct, cos)) + seed(base.mismatch_frac), ok(cos, hi=.70)),
        ("same-width seed mismatch (smallest rung)", "<= 65%", _pct(base.mismatch_frac),
         ok([base.mismatch_frac], hi=.65)),
        (f"largest rung ({largest.width}): latents below density 1e-4", "< 15%",
         _pct(largest.stats_rare_frac) + f" (every rung: {' / '.join(_pct(s.stats_rare_frac) for s in m.saes)})",
         ok([largest.stats_rare_frac], hi=.1499)),
        ("always-on latents' share of active slots", "<= 15%", " / ".join(map(_pct, shares)), ok(shares, hi=.15)),
        ("meta-SAE variance explained: train / held-out / random-row control held-out",
         ">= 45% / >= 25% / >= 5x below held-out", f"{_pct(tr)} / {_pct(ho)} / {_pct(rnd)}",
         tr >= .45 and ho >= .25 and rnd * 5 <= ho),
        ("person showcase: a meta-latent with >= 3 scientist/statesman members, per meta seed", "3 of 3 seeds",
         f"{sum((s.scientist_members or 0) >= 3 for s in person)} of {len(person)}",
         len(person) >= 3 and all((s.scientist_members or 0) >= 3 for s in person)),
        ("nationality showcase: a meta-latent with Germany/German among its members, per meta seed", "3 of 3 seeds",
         f"{sum(bool(s.german_member) for s in nat)} of {len(nat)}",
         len(nat) >= 3 and all(s.german_member for s in nat)),
        ("stitching curves: steps where MSE does not rise", ">= 90%",
         " / ".join(map(_pct, mono)) + (f" (groups that lower MSE alone: {' / '.join(map(_pct, alone))}; "
                                        f"whole families: {' / '.join(map(_pct, fams))})"
                                        if any(a is not None for a in alone) else ""), ok(mono, .9)),
    ]


def write_report(atlas_path: str | Path, out_dir: str | Path) -> Path:
    atlas = Atlas.open(atlas_path)
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    m = atlas.manifest
    facts = overview.overview_facts(atlas)
    pairs = overview.pair_summaries(atlas)
    ladder = overview.ladder_table(atlas)
    curves = overview.curves(atlas)
    f_ladder = _png(plots.ladder_figure(ladder, curves), fig_dir / "mse_vs_l0.png")
    f_novel = _png(plots.novel_fraction_figure(pairs), fig_dir / "novel_fraction.png", height=380)
    f_cos = _png(plots.max_cos_figure(overview.max_cos(atlas), facts["threshold"]), fig_dir / "max_cos.png")
    f_train = _png(plots.training_curves_figure(atlas.training_curves()), fig_dir / "training_fvu.png", height=380)
    largest = atlas.widths[-1]
    f_terms = _png(meta_terms_figure(atlas, largest), fig_dir / "meta_terms.png", height=350)
    bcfg = m.build.config
    ms = m.meta_sae
    ov = ms.overlap or Overlap()
    base = m.stitching.seed_baseline or SeedBaseline()
    rows = ms.rows or MetaRows()
    pair_rows = m.stitching.pairs
    details = [pair_detail(atlas, p.small, p.large) for p in pair_rows]
    tgt = targets(m)
    lines = [
        "# Results on the bundled demo atlas",
        "",
        f"Generated by `python -m metasae.report --atlas {atlas_path} --out {out_dir}` from the atlas built with "
        f"`{m.build.command}`.",
        "",
        f"Model **{m.model.name}**, hook `{m.model.hook}` (d_model {m.model.d_model}); corpus "
        f"{', '.join(m.corpus.sources)}, {m.corpus.n_tokens or 0:,} tokens. "
        f"Ladder {', '.join(str(w) for w in atlas.widths)} (BatchTopK k={bcfg.get('k')}, "
        f"{bcfg.get('train_tokens', 0):,} training tokens each, inputs centred on the data mean"
        + (f", AuxK window {bcfg['train_dead_window_tokens']:,} tokens" if bcfg.get("train_dead_window_tokens") else "")
        + "); meta-SAE "
        f"{ms.width} meta-latents, k={ms.k}.",
        "",
        "Every number below stands next to the baseline that says what it would be by chance or by "
        "non-convergence: the same width trained with another seed, random rows for the meta-SAE, random pairs "
        "for the co-membership overlap.",
        "",
        "## Targets",
        "",
        *targets_table(tgt),
        "",
        "## The ladder",
        "",
        "| width | L0 | MSE | FVU | CE loss | ΔCE vs clean | dead | density < 1e-4 | always-on latents | "
        "their share of active slots |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {s.width} | {_nan(s.l0):.1f} | {_nan(s.mse):.2f} | {_nan(s.fvu):.3f} | {_nan(s.ce_loss):.3f} | "
          f"{_nan(s.ce_delta):+.3f} | {_or_dash(s.stats_n_dead)} | {_pct(s.stats_rare_frac)} | "
          f"{_or_dash(s.n_always_on)} | {_pct(s.always_on_share)} |" for s in m.saes],
        "",
        f"Dead and rare counts come from the statistics pass ({bcfg.get('stats_tokens', 0):,} tokens); always-on "
        "latents (firing on over 90% of tokens) and their share of all active (token, latent) slots from the "
        "held-out evaluation tokens. The first demo atlas spent ~50% of its k budget on 16-20 always-on latents "
        "per rung; subtracting the training data's mean before encoding (folded into the saved weights) removed "
        "them (measured at width 1152 on 400k tokens: 19 always-on latents -> 0, dead 37% -> 12%, FVU "
        "0.375 -> 0.238).",
        "",
        "Convergence: the FVU of the training batches as training goes on (recorded by the build every 100 steps; "
        "the atlas's training_curves table):",
        "",
        f"![training FVU](figures/{f_train})",
        "",
        "## Finding 1: larger SAEs add novel latents and re-cut old ones",
        "",
        "Novel, as the paper defines it: a live latent of the larger SAE that *lowers the small SAE's MSE when "
        "inserted into it*. The decoder-cosine test (no smaller latent at cos >= "
        f"{m.stitching.threshold}) is the paper's cheap proxy. Both are shown beside the same numbers for "
        f"two SAEs of the same width ({_or_dash(base.width)}) trained with different seeds.",
        "",
        "| pair | live latents | **novel (functional)** | novel (cosine proxy) | cosine-novel that help | "
        "cosine-matched that help | MSE does not rise along the path | groups that lower MSE alone | attribution vs exact ΔCE (Spearman: all "
        "/ \\|ΔCE\\| < 0.05; first-order alone) | paper |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {p.small}→{p.large} | {_or_dash(p.n_live_large)} | **{_pct(p.novel_frac_functional)}** | "
          f"{_pct(p.novel_frac_cos_live)} | {_pct(p.cos_novel_that_help)} | "
          f"{_pct(p.cos_recon_that_help)} | {_pct(p.monotone_frac)} | "
          f"{_pct(p.groups_help_alone)} | "
          f"{_nan(p.attr_spearman):.2f} / {d['spearman_small']:.2f} (n={d['n_small']})"
          f"{f'; {p.attr_spearman_plain:.2f}' if p.attr_spearman_plain is not None else ''} | "
          f"{PAPER['novel_frac']} |" for p, d in zip(pair_rows, details, strict=True)],
        f"| same width, other seed ({_or_dash(base.width)}) | {_or_dash(base.n_live)} | "
        f"**{_pct(base.novel_frac_functional)}** | {_pct(base.mismatch_frac)} | | | | | | "
        "converged seeds: ~0% |",
        "",
        _seed_sentence(pair_rows, m.stitching.seed_baseline),
        "",
        f"![novel fraction](figures/{f_novel})",
        "",
        f"Max cosine of each latent with the next smaller SAE (threshold {facts['threshold']}); the seed pair's "
        f"median max cosine is {_nan(base.median_max_cos):.2f}:",
        "",
        f"![max cosine](figures/{f_cos})",
        "",
        "Stitching: starting from the small SAE, novel latents are added, swap groups exchanged and unmatched "
        "small latents removed one at a time, each action ranked by its own ΔMSE against the small SAE (largest "
        "benefit first). Along each path:",
        "",
        "| pair | MSE small → large | lowest MSE on the path (step) | highest MSE on the path (step) | "
        "CE small → large | lowest CE measured (step) | highest CE measured (step) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[path_row(s, lg, c) for (s, lg), c in sorted(curves.items()) if not c.empty],
        *ce_note(curves),
        "",
        f"![MSE vs L0](figures/{f_ladder})",
        "",
        "## Finding 2: latents decompose into meta-latents",
        "",
        f"The meta-SAE is trained on the unit decoder rows of {_or_dash(rows.source)} rungs "
        f"({_or_dash(rows.n_train)} rows for training, {_or_dash(rows.n_heldout)} held out), keeping latents "
        f"with density in [{rows.min_density}, {rows.max_density}] (dead, ultra-rare and dense "
        "latents left out). The control is the same meta-SAE trained on as many random unit vectors.",
        "",
        "| | demo | control / chance | paper |",
        "|---|---:|---:|---|",
        f"| variance explained, training rows | {_pct(1 - _nan(ms.train_fvu))} | "
        f"{_pct(1 - _nan(ms.random_train_fvu))} (random rows) | {PAPER['meta_var_explained']} |",
        f"| variance explained, held-out rows | {_pct(1 - _nan(ms.heldout_fvu))} | "
        f"{_pct(1 - _nan(ms.random_heldout_fvu))} (random rows) | |",
        *([f"| the largest rung's rows alone ({ms.largest_only.n_rows} rows): train / held-out | "
           f"{_pct(1 - _nan(ms.largest_only.train_fvu))} / {_pct(1 - _nan(ms.largest_only.heldout_fvu))} | | |"]
          if ms.largest_only else []),
        *_sibling_rows(ms),
        f"| held-out, each meta seed | {' / '.join(_pct(1 - _nan(f)) for f in ms.seed_heldout_fvu)} | | |",
        f"| meta-latents found again by other seeds (cos >= {_seed_threshold(ms):g}) | "
        f"{_pct(ms.seed_matched_frac)} | | |",
        f"| meta-latents per latent (mean, width {largest}) | {_nan(ms.terms_per_latent):.2f} | | "
        f"{PAPER['terms']} |",
        f"| stitching pairs ({atlas.widths[0]} vs {largest}) that share a meta-latent | "
        f"{'not measurable (' + str(ov.pairs_stitch) + ' pairs)' if ov.overlap is None else _pct(ov.overlap)} | "
        f"{_pct(ov.chance, 2)} (random pairs) | {PAPER['overlap']} |",
        "",
        f"![meta-latents per latent](figures/{f_terms})",
        "",
        "### The showcase, chosen by the build",
        "",
        "The build picks, from every width, the live latent whose top activating tokens are most a famous-person, "
        "a nationality and a science word list, then decomposes it with each meta-SAE seed.",
        "",
    ]
    for p in m.showcase:
        dec = atlas.decomposition(p.width, p.latent)
        parts = ", ".join(f"**{r.label}** ({r.weight:.2f})" for r in dec.itertuples())
        seeds = "; ".join(f"seed {i}: {s.scientist_members} scientist/statesman members, "
                          f"{'a' if s.german_member else 'no'} German member" for i, s in enumerate(p.seeds))
        lines += [f"- **{p.role}** — latent {p.width}/{p.latent} “{p.label}” ({p.why}) → {parts}. "
                  f"Across meta seeds: {seeds}.", ""]
    lines += _differences(atlas, m, bcfg, ms)
    lines += intervention_block(out_dir / "intervention.md")
    path = out_dir / "results.md"
    path.write_text("\n".join(lines) + "\n")
    update_atlas_readme(Path(atlas_path) / "README.md", tgt)
    return path


TARGETS_START, TARGETS_END = "<!-- targets:start -->", "<!-- targets:end -->"


def targets_table(rows: list[tuple[str, str, str, bool | None]]) -> list[str]:
    return ["| measure | target | this atlas | met |", "|---|---|---|:-:|",
            *[f"| {a} | {b} | {c} | {'yes' if d else 'no'} |" for a, b, c, d in rows]]


def update_atlas_readme(readme: Path, rows: list[tuple[str, str, str, bool | None]]) -> bool:
    """Rewrite the targets table between the markers of an atlas's README (so its numbers are never typed by
    hand); a README without the markers is left as it is. True when the table was written."""
    text = readme.read_text() if readme.is_file() else ""
    new = replace_marked(text, TARGETS_START, TARGETS_END, "\n".join([TARGETS_START, *targets_table(rows), TARGETS_END]))
    if new is None:
        return False
    readme.write_text(new)
    return True


def replace_marked(doc: str, start: str, end: str, block: str) -> str | None:
    """`doc` with everything from `start` to `end` (markers included) replaced by `block`; None without both."""
    if start not in doc or end not in doc:
        return None
    return doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]


def _or_dash(x: object) -> str:
    return "—" if x is None else str(x)


def _sibling_rows(ms: MetaSaeInfo) -> list[str]:
    """Held-out rows split by their nearest training row: recall of a sibling (the same latent at another width)
    versus generalisation to rows without one."""
    rows = []
    for b in ms.heldout_by_nearest:
        where = (f"below {b.hi:g}" if b.lo <= -1 else f"at or above {b.lo:g}" if b.hi >= 1
                 else f"{b.lo:g} to {b.hi:g}")
        rows.append(f"| held-out rows whose nearest training row has cos {where} ({b.n} rows) | "
                    f"{_pct(None if b.heldout_fvu is None else 1 - b.heldout_fvu)} | | |")
    return rows


def _seed_threshold(ms: MetaSaeInfo) -> float:
    s = ms.seed_stability
    return s.threshold if isinstance(s, SeedStability) else COS_THRESHOLD


def _seed_sentence(pairs: list[StitchPair], base: SeedBaseline | None) -> str:
    """One plain sentence on what the seed baseline says about the novel fractions."""
    if base is None:
        return "No same-width seed baseline in this atlas: the novel fractions cannot be told from non-convergence."
    func = [p.novel_frac_functional for p in pairs if p.novel_frac_functional is not None]
    bf = base.novel_frac_functional
    if not func or bf is None:
        return ""
    lo, hi = min(func), max(func)
    return (f"Between neighbouring widths {_pct(lo)}-{_pct(hi)} of live latents are novel by the paper's "
            f"definition; between two seeds of the same width {_pct(bf)} are, and {_pct(base.mismatch_frac)} "
            "have no cosine partner. "
            + ("So most of the cross-width novelty is more than seed noise. " if lo > 2 * bf else
               "So a good part of the cross-width novelty is what a second seed alone gives: the SAEs are not "
               "converged enough to call those latents new. "))


def _differences(atlas: Atlas, m: Manifest, bcfg: dict[str, Any], ms: MetaSaeInfo) -> list[str]:
    return [
        "## Where the demo differs from the paper",
        "",
        "- Model and scale: SmolLM2-135M (30 layers, d_model 576) at layer 15, not GPT-2 small at layer 8; widths "
        f"{atlas.widths[0]}..{atlas.widths[-1]} instead of 768..98304; {m.corpus.n_tokens or 0:,} tokens of "
        "Wikipedia sample and WordNet glosses instead of hundreds of millions of web tokens; each SAE trained on "
        f"{bcfg.get('train_tokens', 0):,} tokens on a 2-core CPU. The ladder stops at 4608: 9216 at 3M tokens would "
        "take ~80 min of one core alone, over the build's budget.",
        "- Architecture: BatchTopK (k=32, saved as JumpReLU) instead of ReLU+L1, so L0 is nearly the same across "
        "widths, whereas the paper's ladder lets L0 grow slowly with width.",
        "- Attention sinks: besides position 0, about 0.006% of tokens have residual norms 10-100x the median and "
        "held over half of the variance; they are left out of training and of MSE/FVU/ΔMSE "
        f"(max_norm_ratio = {bcfg.get('max_norm_ratio')}) but stay in the CE evaluation.",
        _meta_scale_line(ms.rows.n_rows if ms.rows else None, ms.rows.source if ms.rows else None, ms.width,
                         m.model.d_model),
        "- ΔCE is measured on a few thousand evaluation tokens; attribution ΔCE is stored for every latent (first "
        "order, with its largest latent-context terms replaced by their exact change) and the exact value for a "
        "sample per pair (see the Spearman column: the sample is small, n=15-16, and half of it is chosen among "
        "the largest attributed effects).",
        "",
        "## Intervention lab (issue 12)",
        "",
        "The knowledge-editing evaluation: latent vs meta-latent edits on WordNet people (method, the "
        "decomposability score and the ladder-wide neighbours in [intervention.md](intervention.md); "
        "`scripts/intervention_eval.py` writes the block below there, and this report copies it).",
        "",
    ]


def _meta_scale_line(n_rows: int | None, source: str | None, width: int | None, d_model: int | None) -> str:
    """How the meta-SAE's size compares with the paper's (2304 meta-latents on 49152 rows: 3x d_model, 21 rows each)."""
    if not (n_rows and width and d_model):
        return "- The meta-SAE's rows or width are not recorded in this atlas's manifest."
    where = "pooled from every rung" if source == "pooled" else "of the widest rung"
    return (f"- The meta-SAE reads {n_rows:,} rows {where} into {width:,} meta-latents "
            f"({width / d_model:.1f}x d_model, {n_rows / width:.1f} rows per meta-latent); the paper's reads 49,152 "
            "rows of one SAE into 2,304 (3x d_model, 21 rows each). With so few rows per meta-latent it memorises "
            "part of them: the held-out rows and the random-row control say how much.")


EVAL_START, EVAL_END = "<!-- intervention-eval:start -->", "<!-- intervention-eval:end -->"


def intervention_block(path: Path) -> list[str]:
    """The editing evaluation's table and worked example, as scripts/intervention_eval.py last wrote them."""
    text = path.read_text() if path.is_file() else ""
    if EVAL_START not in text or EVAL_END not in text:
        return ["(not measured yet: run `python scripts/intervention_eval.py --atlas data`)"]
    body = text.split(EVAL_START, 1)[1].split(EVAL_END, 1)[0].strip()
    # headings inside the block sit one level below this section's
    return [("#" + ln) if ln.startswith("#") else ln for ln in body.splitlines()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="data")
    p.add_argument("--out", default="docs")
    a = p.parse_args(argv)
    print(write_report(a.atlas, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
