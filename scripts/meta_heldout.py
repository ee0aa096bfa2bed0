"""How much of a pooled meta-SAE's held-out score comes from cross-width siblings: held-out variance explained,
split by each held-out row's highest cosine with any training row (the same latent at another width is ~0.7+).

    python scripts/meta_heldout.py WORK_DIR

Rebuilds the meta stage's rows and split from the work folder (its config, SAEs and statistics) and reads the
meta-SAEs it trained (`meta_seeds/seed0`, `largest`, `random`). The result for the bundled atlas is in
data/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from metasae import meta as mt
from metasae.pipeline.stages import read_work_config
from metasae.sae import Sae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    work = p.parse_args().work
    cfg = read_work_config(work)
    saes = [Sae.load(work / "saes" / str(w)) for w in cfg.ladder.widths]
    dens = {w: pd.read_parquet(work / "stats" / f"latents_{w}.parquet").density.to_numpy() for w in cfg.ladder.widths}
    rc = mt.recipe([(s.width, s.W_dec, dens[s.width]) for s in saes],
                   mt.RowFilter(cfg.meta.min_density, cfg.meta.max_density), pooled=cfg.meta.rows == "pooled",
                   n_seeds=1, seed=cfg.seed)
    for name, job in rc.jobs.items():
        meta = Sae.load(work / "meta_seeds" / name)
        parts = [f"all {len(job.heldout_rows)}: {1 - mt.meta_fvu(meta, job.heldout_rows):.1%}"]
        for b in mt.heldout_by_nearest(meta, job.train_rows, job.heldout_rows):
            fvu = b["heldout_fvu"]
            parts.append(f"cos [{max(b['lo'], 0):.1f}, {b['hi']:.1f}) {b['n']}: "
                         + ("-" if fvu is None else f"{1 - fvu:.1%}"))
        print(f"{name:>8} held-out variance explained; " + "; ".join(parts))


if __name__ == "__main__":
    main()
