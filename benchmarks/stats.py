"""Dashboard statistics: one streaming pass for all latents vs one pass per latent (the SAEDashboard way).

    python -m benchmarks.stats --json [--quick]

Both run on the same SAE and the same real SmolLM2 activations; the per-latent pass is timed on a sample of
latents and scaled to all of them. The last line is one JSON object with `stats_vs_per_latent`.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from benchmarks.common import best_of, measure, real_setup
from metasae.stats import latent_stats, per_latent_stats_loop


def run(quick: bool, saes_dir: str | None = None) -> dict:
    torch.manual_seed(0)
    lm, hook, tokens, _, sae = real_setup(quick, saes_dir)
    acts = torch.cat([lm.resid(tokens[b:b + 8], hook).half() for b in range(0, len(tokens), 8)])
    chunks = lambda: iter([(b, acts[b:b + 64]) for b in range(0, len(acts), 64)])  # noqa: E731
    with measure() as m:
        t_one, s = best_of(lambda: latent_stats(sae, chunks(), k=10, progress=False), repeats=2)
    sample = torch.randperm(sae.width)[: 16 if quick else 48].tolist()
    with measure() as m2:
        t_loop, ref = best_of(lambda: per_latent_stats_loop(sae, acts, sample, k=10), repeats=1)
    # the two must agree before their speed is worth comparing
    dens_err = max(abs(r["density"] - float(s.density[j])) for j, r in zip(sample, ref, strict=True))
    top_ok = all(np.allclose(sorted(r["top_val"], reverse=True), s.top_val[j][: len(r["top_val"])], rtol=1e-4)
                 for j, r in zip(sample, ref, strict=True))
    return {"sae_width": sae.width, "n_tokens": int(acts.shape[0] * (acts.shape[1] - 1)),
            "stats_vs_per_latent": (t_loop / len(sample) * sae.width) / t_one,
            "seconds_one_pass": t_one, "seconds_per_latent_sample": t_loop, "sample": len(sample),
            "density_max_abs_err": dens_err, "top_examples_agree": top_ok,
            "peak_mb": {"one_pass": m.peak_mb, "per_latent": m2.peak_mb}, "goal": ">= 10"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--saes", help="folder of trained SAEs in width subfolders (default data/saes)")
    a = p.parse_args(argv)
    r = run(a.quick, a.saes)
    print(f"stats_vs_per_latent: {r['stats_vs_per_latent']:.1f}x (goal >= 10) on width {r['sae_width']}, "
          f"{r['n_tokens']} tokens; results agree: {r['top_examples_agree']}")
    if a.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
