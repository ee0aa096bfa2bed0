"""Train some widths of a build's ladder in this process (run several, one thread each, side by side).

    OMP_NUM_THREADS=1 python scripts/train_widths.py WORK_DIR 9216 &
    OMP_NUM_THREADS=1 python scripts/train_widths.py WORK_DIR 1152 2304 4608 &

Uses the build's own config.json and the same seeds as `metasae build`, so the ladder is identical to one
trained by a single build process; run `metasae build` again afterwards to continue with the other stages.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from metasae.activations import ActivationStore
from metasae.build import BuildConfig, n_eval_ctx, train_config
from metasae.train import train_ladder


def main(argv: list[str]) -> int:
    work, widths = Path(argv[0]), [int(w) for w in argv[1:]]
    cfg = BuildConfig(**json.loads((work / "config.json").read_text()))
    store = ActivationStore.open(work / "acts")
    tcfg = train_config(cfg)
    # the build names SAEs after the loaded model, which the activation store recorded
    train_ladder(store, cfg.widths, tcfg, work / "saes", hook=cfg.hook, model=store.meta["model"],
                 eval_ctx=n_eval_ctx(cfg), only=widths)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
