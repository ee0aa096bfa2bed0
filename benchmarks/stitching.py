"""Stitching speed on real SmolLM2 activations: closed forms vs the naive loops they replace.

    python -m benchmarks.stitching --json [--quick]

Every figure is a ratio of two timings taken in the same run (absolute times on shared machines mean little):
- dmse_vs_pass: all-latent ΔMSE (both encoders, sparse closed form) / one plain encode+decode of the large SAE;
- dmse_vs_loop: per-latent insertion loop (timed on a sample, scaled to all latents) / closed form;
- dce_exact_vs_loop: per-latent ablation loop (whole model with a replacing hook, all contexts) / batched exact
  ΔCE (which reruns each context only from the latent's first firing position, the clean prefix's keys/values
  reused), per latent; dce_exact_vs_splice_loop: the same loop already skipping the layers before the hook;
  dce_prefix_vs_whole: batched exact ΔCE rerunning whole contexts / with the prefix reused;
- attr_spearman_all / _top / _random: rank correlation of attribution ΔCE with exact ΔCE on the build's kind of
  sample (the top half of the latents by |attribution| plus a random half of those that fire), for plain
  attribution and (suffix _corrected) with the EXACT_PAIRS_PER_CTX * n_contexts largest (latent, context) pairs
  computed exactly; attr_corrected_cost_ratio: its time / plain attribution's.
Peak RSS growth of each step is reported in MB. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from scipy.stats import spearmanr

from benchmarks.common import best_of, measure, real_setup
from metasae import stitching as st

GOALS = {"dmse_vs_pass": "<= 1.5", "dmse_vs_loop": ">= 100", "dce_exact_vs_loop": ">= 10",
         "attr_spearman_all_corrected": ">= 0.8", "attr_spearman_top_corrected": ">= 0.9"}
EXACT_PAIRS_PER_CTX = 8  # the build's budget: exact_pairs = 8 * contexts


def run(quick: bool, saes_dir: str | None = None, n_sample: int | None = None,
        budgets: tuple[int, ...] = ()) -> dict:
    torch.manual_seed(0)
    lm, hook, tokens, small, large = real_setup(quick, saes_dir)
    acts = torch.cat([lm.resid(tokens[b:b + 8], hook)[:, 1:].reshape(-1, lm.d_model).float()
                      for b in range(0, len(tokens), 8)])
    L = large.width
    out: dict = {"model": lm.name, "hook": hook, "small": small.width, "large": L, "n_tokens": int(acts.shape[0]),
                 "threads": torch.get_num_threads(), "peak_mb": {}}

    def plain_pass():
        for b in range(0, acts.shape[0], 4096):
            large.decode(large.encode(acts[b:b + 4096]))

    def closed_form():
        sp = st.sparse_acts(small, large, acts)
        return st.latent_delta_mse(small, large, sp)

    with measure() as m:
        t_pass, _ = best_of(plain_pass)
    out["peak_mb"]["plain_pass"] = m.peak_mb
    with measure() as m:
        t_dmse, dmse = best_of(closed_form)
    out["peak_mb"]["dmse_closed_form"] = m.peak_mb
    sample = torch.randperm(L)[: 8 if quick else 24].tolist()
    with measure() as m:
        t_loop, ref = best_of(lambda: st.delta_mse_loop(small, large, acts, sample), repeats=1)
    out["peak_mb"]["dmse_loop"] = m.peak_mb
    out["dmse_max_rel_err"] = float(((ref - dmse[sample]).abs() / ref.abs().clamp_min(1e-6)).max())
    out["dmse_vs_pass"] = t_dmse / t_pass
    out["dmse_vs_loop"] = (t_loop / len(sample) * L) / t_dmse

    # ΔCE on a smaller context set: exact (batched, only where active, from the first firing position on)
    # vs the per-latent loops; attribution (plain and with exact pairs) vs exact on the build's kind of sample
    ce_tokens = tokens[: 16 if quick else 32]
    with measure() as m:
        cs = st.ce_set(lm, hook, ce_tokens, small, large)
    out["peak_mb"]["ce_set"] = m.peak_mb
    item_of = torch.cat([torch.full((small.width,), L), torch.arange(L)])
    ones = torch.ones(small.width + L)
    with measure() as m:
        t_attr, attr = best_of(lambda: st.delta_ce_attribution(lm, hook, cs, small, large, item_of, ones, L + 1),
                               repeats=1)
    out["peak_mb"]["dce_attribution"] = m.peak_mb
    budget = EXACT_PAIRS_PER_CTX * len(ce_tokens)
    with measure() as m:
        t_corr, corr = best_of(lambda: st.delta_ce_attribution(lm, hook, cs, small, large, item_of, ones, L + 1,
                                                               exact_pairs=budget), repeats=1)
    out["peak_mb"]["dce_attribution_corrected"] = m.peak_mb
    # the build's sample (stages._stitch_pair): the top half by |attribution| plus a random half of the latents
    # that fire on the CE tokens (a silent latent has ΔCE 0 both ways and says nothing)
    attr_l = attr[:L].numpy()
    n_exact = min(L, n_sample or (32 if quick else 128))
    top = np.argsort(-np.abs(attr_l))[: n_exact // 2]
    rest = np.setdiff1d(np.flatnonzero(attr_l != 0), top)
    chosen = np.sort(np.concatenate([top, np.random.default_rng(0).choice(rest, n_exact - len(top),
                                                                           replace=False)])).tolist()
    cs.prefix = None  # the timed exact run records its own base pass
    with measure() as m:
        t_exact, exact = best_of(lambda: st.delta_ce_exact(lm, hook, cs, small, large, item_of, ones, chosen),
                                 repeats=1)
    out["peak_mb"]["dce_exact"] = m.peak_mb
    whole_sample = chosen[: 8 if quick else 16]
    t_whole, ex_whole = best_of(lambda: st.delta_ce_exact(lm, hook, cs, small, large, item_of, ones, whole_sample,
                                                          reuse_prefix=False), repeats=1)
    def reuse():
        cs.prefix = None  # count the base pass that records the keys/values
        return st.delta_ce_exact(lm, hook, cs, small, large, item_of, ones, whole_sample, reuse_prefix=True)

    t_reuse, ex_reuse = best_of(reuse, repeats=1)
    loop_sample = chosen[:2 if quick else 4]
    with measure() as m:
        t_ce_loop, ce_ref = best_of(lambda: st.delta_ce_loop(lm, hook, ce_tokens, small, large, loop_sample),
                                    repeats=1)
    out["peak_mb"]["dce_loop"] = m.peak_mb
    with measure() as m:
        t_naive, ce_naive = best_of(lambda: st.delta_ce_loop(lm, hook, ce_tokens, small, large, loop_sample,
                                                             naive=True), repeats=1)
    out["peak_mb"]["dce_loop_naive"] = m.peak_mb
    out["dce_exact_max_abs_err"] = float(max((ce_ref - exact[: len(loop_sample)]).abs().max(),
                                             (ce_naive - exact[: len(loop_sample)]).abs().max()))
    out["dce_prefix_max_abs_err"] = float((ex_whole - ex_reuse).abs().max())
    # the anchor: a plain run-with-hooks loop (whole model per latent); also vs a loop that already splices
    out["dce_exact_vs_loop"] = (t_naive / len(loop_sample)) / (t_exact / len(chosen))
    out["dce_exact_vs_splice_loop"] = (t_ce_loop / len(loop_sample)) / (t_exact / len(chosen))
    out["dce_prefix_vs_whole"] = t_whole / t_reuse
    ex = exact.numpy()
    is_top = np.isin(chosen, top)
    for name, est in (("", attr), ("_corrected", corr)):
        e = est[:L][chosen].numpy()
        out[f"attr_spearman_all{name}"] = float(spearmanr(ex, e).statistic)
        out[f"attr_spearman_top{name}"] = float(spearmanr(ex[is_top], e[is_top]).statistic)
        out[f"attr_spearman_random{name}"] = float(spearmanr(ex[~is_top], e[~is_top]).statistic)
        out[f"attr_sign_agreement{name}"] = float(np.mean(np.sign(ex) == np.sign(e)))
    out["attr_spearman"] = out["attr_spearman_all"]
    # the accuracy / cost curve of the exact-pair budget (pairs per context), on the same exact sample
    out["attr_budget_curve"] = []
    for per_ctx in budgets:
        t_b, est = best_of(lambda n=per_ctx: st.delta_ce_attribution(lm, hook, cs, small, large, item_of, ones,
                                                                     L + 1, exact_pairs=n * len(ce_tokens)),
                           repeats=1)
        e = est[:L][chosen].numpy()
        out["attr_budget_curve"].append({
            "pairs_per_ctx": per_ctx, "spearman_all": float(spearmanr(ex, e).statistic),
            "spearman_top": float(spearmanr(ex[is_top], e[is_top]).statistic),
            "cost_ratio": t_b / t_attr, "cost_vs_exact": t_b / t_exact * len(chosen) / L})
    out["attr_corrected_cost_ratio"] = t_corr / t_attr
    out["exact_pairs"] = budget
    out["n_exact_latents"] = n_exact
    out["ce_contexts"] = len(ce_tokens)
    out["seconds"] = {"plain_pass": t_pass, "dmse_closed_form": t_dmse, "dmse_loop_sample": t_loop,
                      "dce_attribution": t_attr, "dce_attribution_corrected": t_corr, "dce_exact": t_exact,
                      "dce_exact_whole_sample": t_whole, "dce_exact_reuse_sample": t_reuse,
                      "dce_loop_sample": t_ce_loop, "dce_naive_loop_sample": t_naive}
    out["goals"] = GOALS
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--quick", action="store_true", help="fewer tokens and latents (small machines)")
    p.add_argument("--saes", help="folder of trained SAEs in width subfolders (default data/saes)")
    p.add_argument("--sample", type=int, help="latents with exact ΔCE (default 32 quick, 128)")
    p.add_argument("--budgets", default="", help="comma list of exact pairs per context to also measure "
                                                 "attribution with (e.g. 32,128): attr_budget_curve")
    a = p.parse_args(argv)
    r = run(a.quick, a.saes, a.sample, tuple(int(x) for x in a.budgets.split(",") if x.strip()))
    for k in GOALS:
        print(f"{k:>20}: {r[k]:10.3f}   goal {GOALS[k]}")
    print(f"{'peak MB':>20}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_mb"].items()))
    for b in r["attr_budget_curve"]:
        print(f"{'exact pairs/context':>20}: {b['pairs_per_ctx']:5d}  Spearman all {b['spearman_all']:.3f}, top "
              f"{b['spearman_top']:.3f}, cost {b['cost_ratio']:.1f}x attribution ({b['cost_vs_exact']:.2f}x exact)")
    if a.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
