"""Background jobs (stitching evaluations): a queue served by worker threads, with progress and cancel.

A job is queued, then running, then done | failed | cancelled. Cancelling a queued job ends it at once; a
running one is asked to stop through its ``should_stop`` callback and ends as cancelled at the next check.
Finished jobs are kept for ``ttl_s`` seconds (and at most ``max_kept``), then forgotten.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from metasae.backend.errors import ApiError, free_cuda_cache, is_oom, oom_message

log = logging.getLogger("metasae.backend")

FINAL = ("done", "failed", "cancelled")


class JobCancelled(Exception):
    """Raised inside a job when it was cancelled (the evaluator may raise its own Cancelled instead)."""


def jsonable(obj: Any) -> Any:
    """Tensors and arrays as lists, numpy scalars as Python numbers, NaN/inf as None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    if hasattr(obj, "tolist"):  # numpy array or scalar
        return jsonable(obj.tolist())
    if hasattr(obj, "to_dict"):  # pandas DataFrame -> records
        return jsonable(obj.to_dict(orient="records"))
    return str(obj)


@dataclass
class Job:
    id: str
    kind: str
    request: dict[str, Any]
    status: str = "queued"
    progress: float = 0.0
    message: str = "queued"
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)

    def should_stop(self) -> bool:
        return self.cancel_event.is_set()

    def report(self, fraction: float, message: str = "") -> None:
        """Progress callback handed to the job's function; also the cancellation point."""
        if math.isfinite(fraction):
            self.progress = min(1.0, max(self.progress, float(fraction)))
        if message:
            self.message = message
        if self.cancel_event.is_set():
            raise JobCancelled(f"job {self.id} cancelled")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "status": self.status, "progress": round(self.progress, 4),
                "message": self.message, "result": self.result, "request": self.request,
                "created": self.created, "started": self.started, "finished": self.finished}


class JobManager:
    """Runs job functions `fn(job) -> dict` on `workers` threads; at most `max_jobs` queued + running."""

    def __init__(self, workers: int = 1, max_jobs: int = 8, ttl_s: float = 3600.0, max_kept: int = 256):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metasae-job")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.max_jobs, self.ttl_s, self.max_kept = max_jobs, ttl_s, max_kept

    def counts(self) -> dict[str, int]:
        with self._lock:
            jobs = list(self._jobs.values())
        return {s: sum(j.status == s for j in jobs) for s in ("queued", "running", "done", "failed", "cancelled")}

    def busy(self) -> bool:
        return any(j.status in ("queued", "running") for j in list(self._jobs.values()))

    def _forget_old(self) -> None:
        now = time.time()
        finished = sorted((j for j in self._jobs.values() if j.status in FINAL), key=lambda j: j.finished or 0)
        for j in finished:
            if now - (j.finished or now) > self.ttl_s or len(self._jobs) > self.max_kept:
                del self._jobs[j.id]

    def submit(self, kind: str, request: dict[str, Any], fn: Callable[[Job], dict[str, Any]]) -> Job:
        with self._lock:
            self._forget_old()
            active = sum(j.status in ("queued", "running") for j in self._jobs.values())
            if active >= self.max_jobs:
                raise ApiError(429, f"{active} jobs are queued or running (limit {self.max_jobs}); wait for one "
                                    "to finish or cancel one with DELETE /v1/jobs/{id}")
            job = Job(id=uuid.uuid4().hex, kind=kind, request=request)
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, fn)
        return job

    def _run(self, job: Job, fn: Callable[[Job], dict[str, Any]]) -> None:
        with self._lock:
            if job.cancel_event.is_set():
                return  # cancelled while queued: already final
            job.status, job.started, job.message = "running", time.time(), "starting"
        try:
            result = fn(job)
            if job.cancel_event.is_set():
                raise JobCancelled(f"job {job.id} cancelled")
            job.result = jsonable(result)
            job.progress, job.message, job.status = 1.0, "done", "done"
        except JobCancelled:
            job.status, job.message = "cancelled", f"cancelled at {job.progress:.0%}"
        except ApiError as e:
            job.status, job.message = "failed", e.message
        except Exception as e:  # noqa: BLE001 - any failure becomes the job's message; the service lives on
            if is_oom(e):
                free_cuda_cache()
                job.status, job.message = "failed", oom_message(f"running {job.kind} job {job.id}", e)
            else:
                job.status, job.message = "failed", f"{type(e).__name__}: {e}"
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        finally:
            job.finished = time.time()
            log.info("job %s %s in %.1fs: %s", job.id, job.status, job.finished - (job.started or job.finished),
                     job.message)

    def all(self) -> list[Job]:
        """Every job still kept, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"job_id: no job {job_id!r} here (finished jobs are kept {self.ttl_s:.0f} s; a "
                                "restarted backend forgets every job: start it again)")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job.status in FINAL:
                return job
            job.cancel_event.set()
            if job.status == "queued":
                job.status, job.message, job.finished = "cancelled", "cancelled before it started", time.time()
            else:
                job.message = "cancelling"
        return job

    def shutdown(self) -> None:
        with self._lock:
            for j in self._jobs.values():
                j.cancel_event.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
