"""Train some widths of a build's ladder in this process (run several, one thread each, side by side).

    OMP_NUM_THREADS=1 python scripts/train_widths.py WORK_DIR 9216 &
    OMP_NUM_THREADS=1 python scripts/train_widths.py WORK_DIR 1152 2304 4608 &

Uses the build's own config.json and the same seeds as `metasae build`, so the ladder is identical to one
trained by a single build process; run `metasae build` again afterwards to continue with the other stages.
"""

from __future__ import annotations

import sys
from pathlib import Path

from metasae.pipeline.stages import ladder_jobs, read_work_config, train_ladder_jobs


def main(argv: list[str]) -> int:
    work, widths = Path(argv[0]), {int(w) for w in argv[1:]}
    jobs = [j for j in ladder_jobs(read_work_config(work)) if j[1] in widths]
    train_ladder_jobs(work, jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
