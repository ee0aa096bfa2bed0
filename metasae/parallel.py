"""Independent CPU jobs spread over processes of one torch thread each.

On a 2-core machine that also runs other work, one process with two torch threads can slow several-fold (its
threads wait on each other whenever one is descheduled); single-threaded processes on separate jobs degrade only
in proportion to the load. Jobs must be picklable (module-level functions, `functools.partial` of them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(jobs: Sequence[Callable[[], T]], workers: int, costs: Sequence[float] | None = None) -> list[T]:
    """Run `jobs` (in this process when workers <= 1) and return their results in order.

    With `costs`, the most expensive jobs start first, so the longest one does not end up last on its own.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    order = sorted(range(len(jobs)), key=lambda i: -(costs[i] if costs else 0.0))
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn"),
                             initializer=_one_thread) as pool:
        futures = {i: pool.submit(jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(jobs))]
