"""GET /v1/jobs, GET /v1/jobs/{job_id} (progress, result when done), DELETE /v1/jobs/{job_id} (cancel)."""

from __future__ import annotations

from metasae.backend.jobs import JobManager


def list_jobs(jobs: JobManager) -> list[dict]:
    return [j.to_dict() | {"result": None} for j in jobs.all()]


def get_job(job_id: str, jobs: JobManager) -> dict:
    return jobs.get(job_id).to_dict()


def cancel_job(job_id: str, jobs: JobManager) -> dict:
    return jobs.cancel(job_id).to_dict()
